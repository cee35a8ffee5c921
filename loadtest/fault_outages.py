"""The outage cases of the fault matrix (loadtest/faults.py): a stage crash-looping, the
gateway's callers leaving early, and the broker paused."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import httpx
from fault_cases import SUPERVISING, Calls, Gateway, Row, ask, calls_rows, steady
from harness import Deadline

from kllm.core.stage_status import STATUS_FILE, read_status
from kllm.ops.supervisor import Supervisor
from kllm.testing.callers import leave_early

# -- the gateway ------------------------------------------------------------------------------


def _waiting(gw: Gateway, probes: int = 12) -> int:
    """The most callers any replica says are waiting (the port is shared: each probe
    reaches one replica, the kernel chooses)."""
    seen: list[int] = [
        httpx.get(f"{gw.url}/healthz", timeout=10).json().get("waiting", -1) for _ in range(probes)
    ]
    return max(seen)


def gateway(bootstrap: str, gw: Gateway, deadline: Deadline, pause_s: float) -> list[Row]:
    """100 streaming callers leaving before their first window; then the broker paused
    with SIGSTOP for ``pause_s``: callers get 503 within their deadline, and the
    pipeline answers again after SIGCONT."""
    case = "gateway"
    for i in range(100):
        body = {
            "model": "scripted",
            "stream": True,
            "messages": [{"role": "user", "content": f"Leaving {i} {uuid.uuid4()}"}],
        }
        leave_early(gw.url, gw.key, body, 0.03)
    time.sleep(2.0)
    waiting = _waiting(gw)
    rows = [
        Row(case, "100 streaming callers left early: waiting after", str(waiting), waiting == 0)
    ]
    broker = _broker_pid(bootstrap)
    os.kill(broker, signal.SIGSTOP)
    statuses, took = [], []
    try:
        t_stop = time.monotonic()
        while time.monotonic() - t_stop < pause_s - 1:
            t0 = time.monotonic()
            body = {
                "model": "scripted",
                "messages": [{"role": "user", "content": f"Paused {uuid.uuid4()}"}],
            }
            try:
                r = httpx.post(
                    f"{gw.url}/v1/chat/completions",
                    json=body,
                    headers=gw.headers(f"p-{uuid.uuid4()}"),
                    timeout=60,
                )
                statuses.append(r.status_code)
            except httpx.HTTPError:
                statuses.append(0)
            took.append(time.monotonic() - t0)
    finally:
        os.kill(broker, signal.SIGCONT)
    resumed = time.monotonic()
    unavailable = sum(1 for s in statuses if s == 503)
    rows.append(
        Row(
            case,
            f"broker stopped {pause_s:.0f} s: 503 answers",
            f"{unavailable} of {len(statuses)}, slowest {max(took, default=0):.1f} s",
            unavailable == len(statuses) > 0 and max(took) < 15,
        )
    )
    calls = Calls()
    answer = ask(
        gw, calls, "After the broker came back: what is a partition?", deadline.within(120)
    )
    back = time.monotonic() - resumed
    rows.append(
        Row(
            case,
            "answering again after SIGCONT",
            f"{back:.1f} s" if answer else "no answer",
            answer is not None,
        )
    )
    return rows


def _broker_pid(bootstrap: str) -> int:
    found = subprocess.run(
        ["pgrep", "-f", f"listener-url tcp://{bootstrap} "], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    if len(pids) != 1:
        raise RuntimeError(f"expected one broker at {bootstrap}, found {pids}")
    return pids[0]


# -- a stage crash-looping --------------------------------------------------------------------


def crash_loop(sup: Supervisor, gw: Gateway, deadline: Deadline, rate: float) -> list[Row]:
    """The drift stage started again with a setting it refuses, so it exits at every
    start: the supervisor backs off, marks it failed past its crash budget, and the
    other stages keep answering; then it is started again as it should be."""
    case = "crash-loop"
    calls, stop = Calls(), threading.Event()
    load = steady(rate, stop, deadline, lambda i: ask(gw, calls, f"Crash-loop Q{i}", deadline))
    sup.env["KLLM_DRIFT_WARMUP"] = "1"  # below its minimum: drift exits at start
    t0 = time.monotonic()
    with SUPERVISING:
        sup.kill("drift", 0)
    failed_after = None
    try:
        while not deadline.expired() and time.monotonic() - t0 < 240:
            status = read_status(sup.run_dir / STATUS_FILE)
            if status is not None and "drift-0" in status.named("failed"):
                failed_after = time.monotonic() - t0
                break
            time.sleep(0.5)
        health = httpx.get(f"{gw.url}/healthz", timeout=10).json()
        time.sleep(min(5.0, deadline.left()))
    finally:
        stop.set()
        load.join(deadline.left() + 5)
        del sup.env["KLLM_DRIFT_WARMUP"]
        with SUPERVISING:
            revived = sup.scale("drift", 1)
    drift = sup.find("drift", 0)
    others = [sp for sp in sup.procs if sp.stage != "drift"]
    return [
        Row(
            case,
            "drift marked failed",
            "never"
            if failed_after is None
            else f"after {failed_after:.0f} s, {drift.restarts} restarts",
            failed_after is not None,
        ),
        Row(
            case,
            "/healthz while it is failed",
            str(health.get("status")),
            health.get("status") == "degraded",
        ),
        Row(
            case,
            "other stages running",
            f"{sum(sp.alive() for sp in others)} of {len(others)}",
            all(sp.alive() for sp in others),
        ),
        *calls_rows(case, calls),
        Row(
            case, "started again with its settings fixed", "; ".join(revived) or "-", bool(revived)
        ),
    ]
