"""The fault matrix (loadtest/faults.py, `make bench-faults`) in a short form, run end to
end as a user runs it: poison flood, SIGKILL of every stage, scaling under load. Each
of its rows must pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fault_matrix_passes_every_row() -> None:
    args = ["--cases", "poison,sigkill,scale", "--poison", "400", "--rate", "2", "--settle", "5"]
    run = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "faults.py"), *args, "--limit-s", "540"],
        cwd=REPO,
        env=os.environ | {"KLLM_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    failed = [row for row in rows[1:] if not row.rstrip().endswith("| PASS |")]
    assert run.returncode == 0 and rows and not failed, (
        "\n".join(failed) or run.stdout[-3000:] + run.stderr[-3000:]
    )
    cases = {row.split("|")[1].strip() for row in rows[1:]}
    assert cases == {"poison", "sigkill", "scale"}
