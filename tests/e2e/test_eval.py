"""`kllm eval` on the real pipeline and model: a run scores real answers, and a
regression made on purpose (no retrieval: KLLM_TOP_K=0) fails `kllm eval compare`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.e2e.conftest import REPO
from tests.e2e.test_cli import _env, start_up

GOLDEN = REPO / "eval" / "golden.jsonl"


def _subset(path: Path) -> Path:
    """Six answerable cases, one conversation and two the corpus cannot answer."""
    rows = [orjson.loads(line) for line in GOLDEN.read_bytes().splitlines() if line.strip()]
    pick = [r for r in rows if r["kind"] == "answerable"][:6]
    pick += [r for r in rows if r["kind"] == "multi-turn"][:1]
    pick += [r for r in rows if r["kind"] == "unanswerable"][:2]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in pick))
    return path


def _run(tmp: Path, golden: Path, out: Path, variant: dict[str, str]) -> str:
    env = _env(tmp) | {"KLLM_CACHE": "false", "KLLM_DEFAULT_MAX_TOKENS": "48"} | variant
    up, _ = start_up(env)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kllm.cli", "eval", "run", str(golden), "--out", str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        up.send_signal(signal.SIGINT)
        up.communicate(timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kllm.cli", "eval", "compare", str(a), str(b)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_eval_scores_real_answers_and_compare_catches_a_pipeline_without_retrieval(
    tmp_path: Path,
) -> None:
    golden = _subset(tmp_path / "golden.jsonl")
    base, worse = tmp_path / "base", tmp_path / "top-k-0"
    table = _run(tmp_path / "a", golden, base, {})
    assert "| context_recall |" in table and "| groundedness |" in table

    rows = [orjson.loads(x) for x in (base / "cases.jsonl").read_bytes().splitlines()]
    assert len(rows) == 9 and all(r["answered"] and r["answer"] for r in rows), rows
    assert all(r["model"] for r in rows) and (base / "summary.png").stat().st_size > 1000
    metrics = orjson.loads((base / "summary.json").read_bytes())["metrics"]
    assert metrics["context_recall"] >= 0.5, metrics  # the docs/ corpus holds these answers
    assert metrics["groundedness"] is not None and metrics["latency_ms"] > 0

    _run(tmp_path / "b", golden, worse, {"KLLM_TOP_K": "0"})
    without = orjson.loads((worse / "summary.json").read_bytes())["metrics"]
    assert without["context_recall"] == 0.0, without

    caught = _compare(base, worse)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert "context_recall" in caught.stderr and "| WORSE |" in caught.stdout
    same = _compare(base, base)
    assert same.returncode == 0, same.stdout + same.stderr
