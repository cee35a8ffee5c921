"""Fault test under load: SIGKILL each stage in turn while callers keep asking.

Every stage runs as its own process (embedded broker; a scripted engine that
answers at once, so the load is the pipeline's). Callers send requests through
the gateway at a steady rate, each with an Idempotency-Key and retries on a
dropped connection, as a careful client would. Each stage in turn is killed
with SIGKILL and restarted by the supervisor; recovery time is from the kill
until the first request sent after it is answered. At the end every request
must have exactly one answer: none lost, none answered twice.

    python loadtest/faults.py --rate 4 --settle 6
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
from harness import free_port, supervised
from scripted_engine import scripted_engine

from kllm.gateway.keys import KeyStore
from topics import STAGES


@dataclass
class Ledger:
    sent: dict[str, float] = field(default_factory=dict)  # idempotency key -> sent at
    answers: dict[str, list[str]] = field(default_factory=dict)  # key -> answer ids
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ask(url: str, key: str, ledger: Ledger, i: int) -> None:
    idem = f"fault-{uuid.uuid4()}"
    body = {"model": "scripted", "messages": [{"role": "user", "content": f"Q{i} {idem}?"}]}
    headers = {"authorization": f"Bearer {key}", "idempotency-key": idem}
    with ledger.lock:
        ledger.sent[idem] = time.monotonic()
    for _attempt in range(20):  # a caller retries a dropped connection with the same key
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=60)
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


def load(url: str, key: str, ledger: Ledger, rate: float, stop: threading.Event) -> None:
    threads, i = [], 0
    while not stop.is_set():
        t = threading.Thread(target=ask, args=(url, key, ledger, i), daemon=True)
        t.start()
        threads.append(t)
        i += 1
        stop.wait(1 / rate)
    for t in threads:
        t.join(180)


def recovery_s(ledger: Ledger, killed_at: float, timeout: float = 180) -> float | None:
    """From the kill until a request sent after it has its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
    args = p.parse_args()
    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.json"
    key = KeyStore(keys).create("faults")[1]
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
            ledger, stop = Ledger(), threading.Event()
            loader = threading.Thread(target=load, args=(url, key, ledger, args.rate, stop))
            loader.start()
            recoveries: dict[str, float | None] = {}
            restarter = threading.Event()

            def keep_restarting() -> None:
                while not restarter.is_set():
                    sup.restart_crashed()
                    restarter.wait(0.2)

            threading.Thread(target=keep_restarting, daemon=True).start()
            time.sleep(args.settle)
            for stage in STAGES:
                killed_at = time.monotonic()
                sup.kill(stage, 0, signal.SIGKILL)
                recoveries[stage] = recovery_s(ledger, killed_at)
                print(
                    f"  {stage:10} killed; answering again after {recoveries[stage]:.1f} s"
                    if recoveries[stage] is not None
                    else f"  {stage:10} did not recover",
                    flush=True,
                )
                time.sleep(args.settle)
            stop.set()
            loader.join(300)
            restarter.set()
    answered = {k: v for k, v in ledger.answers.items() if v}
    lost = [k for k in ledger.sent if k not in answered]
    twice = {k: v for k, v in answered.items() if len(set(v)) > 1 or len(v) > 1}
    print(
        f"requests sent: {len(ledger.sent)}, answered: {len(answered)}, lost: {len(lost)}, "
        f"answered more than once: {len(twice)}, failures: {len(ledger.failures)}"
    )
    for f in ledger.failures[:5]:
        print(f"  {f}")
    print("recovery after SIGKILL (kill until a request sent after it is answered):")
    for stage, s in recoveries.items():
        print(f"  {stage:10} {'-' if s is None else f'{s:.1f} s'}")
    return 0 if not lost and not twice and None not in recoveries.values() else 1


if __name__ == "__main__":
    sys.exit(main())
