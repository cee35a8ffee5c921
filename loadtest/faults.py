"""Fault test under load: SIGKILL each stage in turn while callers keep asking.

Every stage runs as its own process (embedded broker; a scripted engine that
answers at once, so the load is the pipeline's). Callers send requests through
the gateway at a steady rate, each with an Idempotency-Key and retries on a
dropped connection, as a careful client would. Each stage in turn is killed
with SIGKILL and restarted by the supervisor; recovery time is from the kill
until the first request sent after it is answered. At the end every request
must have exactly one answer: none lost, none answered twice.

    python loadtest/faults.py --rate 4 --settle 6

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 600 s); a stage has --recovery-timeout-s (default 60 s) to answer again after
its kill. Stages left when time runs out are reported NOT RUN and callers still retrying
at the deadline as unfinished (INCOMPLETE). Ctrl-C or SIGTERM stops every process it
started and prints what was measured.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from harness import Deadline, free_port, run_limited, supervised

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from kllm.testing.scripted_engine import scripted_engine
from topics import STAGES

LIMIT_S = 600
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


@dataclass
class Ledger:
    sent: dict[str, float] = field(default_factory=dict)  # idempotency key -> sent at
    answers: dict[str, list[str]] = field(default_factory=dict)  # key -> answer ids
    failures: list[str] = field(default_factory=list)
    unfinished: int = 0  # callers still retrying when the deadline passed
    lock: threading.Lock = field(default_factory=threading.Lock)


def ask(url: str, key: str, ledger: Ledger, i: int, deadline: Deadline) -> None:
    idem = f"fault-{uuid.uuid4()}"
    body = {"model": "scripted", "messages": [{"role": "user", "content": f"Q{i} {idem}?"}]}
    headers = {"authorization": f"Bearer {key}", "idempotency-key": idem}
    with ledger.lock:
        ledger.sent[idem] = time.monotonic()
    for _attempt in range(20):  # a caller retries a dropped connection with the same key
        if deadline.expired():
            with ledger.lock:
                ledger.unfinished += 1
            return
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=min(60, deadline.left() + 1))
        except httpx.HTTPError:
            time.sleep(1.0)
            continue
        if r.status_code == 200:
            with ledger.lock:
                ledger.answers.setdefault(idem, []).append(r.json()["id"])
            return
        if r.status_code in (429, 503, 504):
            time.sleep(1.0)
            continue
        with ledger.lock:
            ledger.failures.append(f"HTTP {r.status_code}: {r.text[:120]}")
        return
    with ledger.lock:
        ledger.failures.append(f"{idem}: no answer after 20 tries")


def load(
    url: str, key: str, ledger: Ledger, rate: float, stop: threading.Event, deadline: Deadline
) -> None:
    threads, i = [], 0
    while not stop.is_set() and not deadline.expired():
        t = threading.Thread(target=ask, args=(url, key, ledger, i, deadline), daemon=True)
        t.start()
        threads.append(t)
        i += 1
        stop.wait(1 / rate)
    for t in threads:
        t.join(deadline.left() + 2)


def recovery_s(ledger: Ledger, killed_at: float, until: Deadline) -> float | None:
    """From the kill until a request sent after it has its answer (None: not by ``until``)."""
    while not until.expired():
        with ledger.lock:
            answered_after = [ledger.sent[k] for k in ledger.answers if ledger.sent[k] > killed_at]
        if answered_after:
            return time.monotonic() - killed_at
        time.sleep(0.1)
    return None


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=4, help="requests/s during the test")
    p.add_argument("--settle", type=float, default=6, help="seconds between kills")
    p.add_argument(
        "--recovery-timeout-s",
        type=float,
        default=60,
        help="a stage not answering again this long after its kill counts as not recovered",
    )
    p.add_argument(
        "--limit-s",
        type=float,
        default=LIMIT_S,
        help=f"the whole run, startup and teardown included, ends within this (default {LIMIT_S})",
    )
    args = p.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def kill_each_stage(
    sup: Supervisor,
    ledger: Ledger,
    recoveries: dict[str, float | None],
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    """SIGKILL each stage in turn; record how long until requests are answered again."""
    time.sleep(min(args.settle, deadline.left()))
    for stage in STAGES:
        if deadline.left() < args.settle:
            print(f"  {stage:10} NOT RUN (time limit)", flush=True)
            continue
        killed_at = time.monotonic()
        sup.kill(stage, 0, signal.SIGKILL)
        recoveries[stage] = recovery_s(ledger, killed_at, deadline.within(args.recovery_timeout_s))
        print(
            f"  {stage:10} killed; answering again after {recoveries[stage]:.1f} s"
            if recoveries[stage] is not None
            else f"  {stage:10} did not recover",
            flush=True,
        )
        time.sleep(min(args.settle, deadline.left()))


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.json"
    key = KeyStore(keys).create("faults")[1]
    ledger, stop, restarter = Ledger(), threading.Event(), threading.Event()
    recoveries: dict[str, float | None] = {}
    try:
        with scripted_engine() as script:
            env = {
                "KLLM_GATEWAY_PORT": str(port),
                "KLLM_GATEWAY_KEYS_FILE": str(keys),
                "KLLM_MODELS": orjson.dumps(
                    [{"name": "scripted", "engine": "openai", "url": script, "slots": 8}]
                ).decode(),
                "KLLM_GATEWAY_MODELS": '["scripted"]',
                "KLLM_SESSION_TIMEOUT_MS": "3000",
                "KLLM_HEARTBEAT_INTERVAL_MS": "500",
            }
            with supervised(env=env) as (_bootstrap, sup):
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                loader = threading.Thread(
                    target=load, args=(url, key, ledger, args.rate, stop, deadline), daemon=True
                )
                loader.start()

                def keep_restarting() -> None:
                    while not restarter.is_set():
                        sup.restart_crashed()
                        restarter.wait(0.2)

                restarting = threading.Thread(target=keep_restarting, daemon=True)
                restarting.start()
                try:
                    kill_each_stage(sup, ledger, recoveries, args, deadline)
                    stop.set()
                    loader.join(deadline.left() + 5)
                finally:
                    # Before the pipeline stops: a restart during its teardown would start
                    # a stage again (into a log folder already removed).
                    restarter.set()
                    restarting.join(5)
    finally:
        stop.set()
        restarter.set()
        _report(ledger, recoveries)
    lost = [k for k in ledger.sent if not ledger.answers.get(k)]
    twice = [k for k, v in ledger.answers.items() if len(v) > 1]
    complete = len(recoveries) == len(STAGES) and not ledger.unfinished
    ok = not lost and not twice and None not in recoveries.values()
    return 0 if ok and complete else 1


def _report(ledger: Ledger, recoveries: dict[str, float | None]) -> None:
    with ledger.lock:
        answered = {k: v for k, v in ledger.answers.items() if v}
        lost = [k for k in ledger.sent if k not in answered]
        twice = {k: v for k, v in answered.items() if len(set(v)) > 1 or len(v) > 1}
        print(
            f"requests sent: {len(ledger.sent)}, answered: {len(answered)}, lost: {len(lost)}, "
            f"answered more than once: {len(twice)}, failures: {len(ledger.failures)}"
        )
        if ledger.unfinished or len(recoveries) < len(STAGES):
            print(
                f"INCOMPLETE: {len(STAGES) - len(recoveries)} stages not killed, "
                f"{ledger.unfinished} callers still retrying at the deadline (counted as lost)"
            )
        for f in ledger.failures[:5]:
            print(f"  {f}")
    print("recovery after SIGKILL (kill until a request sent after it is answered):")
    for stage, s in recoveries.items():
        print(f"  {stage:10} {'-' if s is None else f'{s:.1f} s'}")


if __name__ == "__main__":
    sys.exit(main())
