"""Gateway processes for the end-to-end gateway tests: a second replica beside the
pipeline's (its own port, so a test picks the replica). A caller that leaves before any
answer is kllm.testing.callers.leave_early."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from kllm.ops.broker import free_port


@contextmanager
def gateway_process(env: Mapping[str, str], run_dir: Path, name: str) -> Iterator[str]:
    """A gateway replica (``python -m services.gateway``) with ``env``, on a port of its
    own; yields its URL once it listens, stops it (SIGTERM, then SIGKILL) after."""
    port = free_port()
    ready = run_dir / f"ready-{name}"
    ready.unlink(missing_ok=True)
    log = run_dir / f"{name}.log"
    child_env = (
        os.environ
        | dict(env)
        | {
            "KLLM_GATEWAY_PORT": str(port),
            "KLLM_READY_FILE": str(ready),
            "KLLM_METRICS_PORT": "0",
        }
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway {name} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def health(url: str) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{url}/healthz", timeout=10).json()
    return body
