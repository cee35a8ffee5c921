"""The overload test (`make bench-overload`), shortened: 3x capacity, then back to half.

It runs the benchmark script as a user would, with its own broker and stage
processes; the script exits non-zero when the gateway did not shed with 429, an
admitted request failed, memory kept growing, a process exited or restarted, or
latency did not come back once the load dropped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_three_times_capacity_is_shed_and_the_pipeline_recovers() -> None:
    phases = ["--baseline-s", "6", "--overload-s", "16", "--recovery-s", "30"]
    # A busy CI machine drains the admitted callers more slowly than the benchmark's
    # nominal capacity (CI once took 14.5 s against a 12 s limit). This test asks that
    # the pipeline recovers; `make bench-overload` reports how fast, on a quiet machine.
    phases += ["--recovery-slack-s", "18"]
    run = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "overload.py"), *phases],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    report = run.stdout[-3000:]
    assert run.returncode == 0, report + run.stderr[-3000:]
    assert "PASS" in report
    assert "429:" in report.split("overload", 2)[-1]  # shed during the overload phase
