"""`kllm up --demo` as a user runs it: broker, topics, stages, answers, clean stop."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.e2e.conftest import FAST_GROUPS, REPO


@pytest.mark.slow
def test_up_demo_answers_and_leaves_no_process_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = (
        os.environ
        | FAST_GROUPS
        | {
            "KLLM_RUN_DIR": str(tmp_path / "run"),
            "KLLM_QDRANT_PATH": str(tmp_path / "run" / "qdrant"),
            "KLLM_SEED_DIR": str(REPO / "docs"),
            "KLLM_DEFAULT_MAX_TOKENS": "16",
        }
    )
    env.pop("KLLM_BOOTSTRAP_SERVERS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kllm.cli",
            "up",
            "--demo",
            "-q",
            "What does the moderation stage do?",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "pipeline ready in" in out
    assert "Q: What does the moderation stage do?" in out
    answer = out.split("A:", 1)[1].split("\n", 1)[0]
    assert answer.strip()
    assert "stopped" in out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 5, out  # the broker and four stages
    assert not [p for p in pids if _alive(p)], f"processes left behind: {out}"
    assert not (tmp_path / "run" / "state.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
