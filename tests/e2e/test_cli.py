"""`kllm up --demo` as a user runs it: broker, topics, stages, answers, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kllm.core.stage_status import STATUS_FILE, read_status
from kllm.ops.broker import free_port
from kllm.testing.scripted_engine import scripted_engine
from tests.e2e.conftest import FAST_GROUPS, REPO


def _env(tmp_path: Path) -> dict[str, str]:
    env = (
        os.environ
        | FAST_GROUPS
        | {
            "KLLM_RUN_DIR": str(tmp_path / "run"),
            "KLLM_QDRANT_PATH": str(tmp_path / "run" / "qdrant"),
            "KLLM_SEED_DIR": str(REPO / "docs"),
            "KLLM_DEFAULT_MAX_TOKENS": "16",
            "KLLM_GATEWAY_PORT": str(free_port()),
        }
    )
    env.pop("KLLM_BOOTSTRAP_SERVERS", None)
    return env


@pytest.mark.slow
def test_up_demo_answers_and_leaves_no_process_behind(tmp_path: Path) -> None:
    env = _env(tmp_path)
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
    gateway = out.split("via the gateway", 1)[1]  # the same question over the OpenAI API
    assert gateway.split("A:", 1)[1].split("\n", 1)[0].strip()
    assert "stopped" in out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 10, out  # the broker, its storage server (durable) and eight stages
    assert not [p for p in pids if _alive(p)], f"processes left behind: {out}"
    assert not (tmp_path / "run" / "state.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_up_then_ask_from_another_shell_then_sigint_stops_everything(tmp_path: Path) -> None:
    env = _env(tmp_path)
    up, lines = start_up(env)
    try:
        # `ask` finds the embedded broker through the run directory, as a user's shell would.
        ask = subprocess.run(
            [sys.executable, "-m", "kllm.cli", "ask", "What is the dead-letter queue?"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ask.returncode == 0, ask.stdout + ask.stderr
        assert "A: " in ask.stdout and ask.stdout.split("A: ", 1)[1].strip()
        # Scaling a stage of the running pipeline, within its topic's partitions.
        more = kllm(env, "scale", "inference", "2")
        assert more.returncode == 0 and "inference: 2 ready" in more.stdout, more.stderr
        extra_pid = int(re.findall(r"inference-1 pid (\d+)", more.stdout)[0])
        too_many = kllm(env, "scale", "inference", "9")
        assert too_many.returncode == 2 and "partitions" in too_many.stderr
        back = kllm(env, "scale", "inference", "1")
        assert back.returncode == 0 and "inference: 1 ready" in back.stdout, back.stderr
        assert not _alive(extra_pid)
        # A user's own files: ingested, receipts awaited, then cited in an answer.
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "badges.md").write_text(
            "# Badges\n\nVisitors to the Orion lab must wear a green badge. Staff wear blue.\n"
        )
        ingest = kllm(env, "ingest", str(tmp_path / "notes"), "--tenant", "orion")
        assert ingest.returncode == 0, ingest.stdout + ingest.stderr
        assert "1 documents indexed" in ingest.stdout
        cited = kllm(
            env, "ask", "--tenant", "orion", "What badge do visitors to the Orion lab wear?"
        )
        assert cited.returncode == 0, cited.stdout + cited.stderr
        assert re.search(r"sources: .*\bbadges\b", cited.stdout), cited.stdout
        # The embedded store is the retrieval process's while it runs: a clear refusal.
        busy = kllm(env, "search", "badge", "--tenant", "orion")
        assert busy.returncode == 2 and "one process at a time" in busy.stderr, busy.stderr
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    out = "".join(lines) + rest
    assert up.returncode == 0, out
    assert "stopped" in out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 10, out  # the broker, its storage server and eight stages
    assert not [p for p in pids if _alive(p)], f"processes left behind: {out}"

    # Stopped: the store is free, and search shows the ingested chunk.
    hits = kllm(env, "search", "visitor badge colour", "--tenant", "orion")
    assert hits.returncode == 0 and "(badges.md)" in hits.stdout, hits.stdout + hits.stderr


def kllm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kllm.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def start_up(env: dict[str, str], *flags: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`kllm up` started as a user would, once it says the pipeline is ready: the process
    and the lines it printed (killed if it never gets there)."""
    up = subprocess.Popen(
        [sys.executable, "-m", "kllm.cli", "up", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        _read_until(up, lines, "pipeline ready in", 240)
    except BaseException:
        up.kill()
        up.wait()
        raise
    return up, lines


def _read_until(up: subprocess.Popen[str], lines: list[str], prefix: str, timeout_s: float) -> None:
    """Collect ``up``'s output lines until one starts with ``prefix``."""
    assert up.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}:\n{''.join(lines)}")


@pytest.mark.slow
def test_a_crash_looping_stage_fails_alone_and_the_pipeline_keeps_answering(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path) | {
        "KLLM_DRIFT_WARMUP": "1",  # below its minimum: the drift stage exits at every start
        "KLLM_RESTART_BACKOFF_S": "0.5",
        "KLLM_MODELS": "",
        "KLLM_GATEWAY_MODELS": '["scripted"]',
        # The scripted answer as the engine gave it ("Hi?" is in no passage: a grounded
        # pipeline would decline it), so the check below sees it cross every stage.
        "KLLM_ANSWER_POLICY": "flag",
    }
    run = tmp_path / "run"
    with scripted_engine() as script:
        env["KLLM_MODELS"] = f'[{{"name": "scripted", "engine": "openai", "url": "{script}"}}]'
        t0 = time.monotonic()
        up, lines = start_up(env, "--restart-budget", "2")
        try:
            _read_until(up, lines, "Ctrl-C stops everything", 30)
            out = "".join(lines)
            # Crashes 1 and 2 are restarted (at once, then after the backoff); the third
            # is over the budget of 2: failed, with the reason and the log's last lines.
            assert out.count("drift-0 exited with code 1") == 2, out
            assert "drift-0 FAILED: crashed 3 times within 300 s (exit codes 1, 1, 1)" in out
            assert "warmup" in out.split("drift-0 FAILED", 1)[1]  # the validation error
            assert re.search(r"pipeline ready in [\d.]+s without drift-0 \(failed", out), out
            status = read_status(run / STATUS_FILE)
            assert status is not None
            states = {p.name: p for p in status.processes}
            assert (states["drift-0"].state, states["drift-0"].restarts) == ("failed", 2)
            assert states["drift-0"].last_exit_code == 1
            assert {p.state for n, p in states.items() if n != "drift-0"} == {"running"}
            # The gateway says so, and answers: the request path does not need drift.
            url = f"http://127.0.0.1:{env['KLLM_GATEWAY_PORT']}"
            health = httpx.get(f"{url}/healthz", timeout=10)
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "degraded"
            assert health.json()["stages"]["failed"] == ["drift-0"]
            secret = re.findall(r"\(shown once\): (\S+)", out)[0]
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "scripted", "messages": [{"role": "user", "content": "Hi?"}]},
                headers={"authorization": f"Bearer {secret}"},
                timeout=120,
            )
            assert answer.status_code == 200, answer.text
            assert "Partitions keep records" in answer.json()["choices"][0]["message"]["content"]
            # Still up well after the failure, and drift left alone.
            time.sleep(3)
            assert up.poll() is None
            status = read_status(run / STATUS_FILE)
            assert status is not None and status.named("failed") == ["drift-0"]
            print(f"failed and ready after {time.monotonic() - t0:.1f} s", file=sys.stderr)
            up.send_signal(signal.SIGINT)
            rest, _ = up.communicate(timeout=60)
        finally:
            if up.poll() is None:
                up.kill()
    out = "".join(lines) + rest
    assert up.returncode == 0, out
    assert "stopped" in out and not (run / STATUS_FILE).exists()
