"""The fault matrix: poison input, SIGKILL of every stage, scaling under load.

Every stage runs as its own process on the embedded broker, with two processes for each
stage that can have them, and a scripted engine that answers at once, so the load is the
pipeline's. Callers go through the gateway with an Idempotency-Key and retries, as a
careful client does. The cases, in order (--cases picks some):

- poison: 2,000 malformed records (20 of them 1-8 MB, nulls, bad UTF-8) published to
  the request topic by a plain producer: each dead-lettered exactly once, no restart,
  valid requests before and after answered.
- sigkill: each stage's first process killed in turn under load (its peer takes over
  where it has one); the supervisor restarts it. None lost, none answered twice.
- scale: ingestion, moderation and feedback scaled 2 -> 1 -> 2 under load, with streamed
  callers, a tenant at its quota and feedback: quotas hold, streams arrive whole and
  equal to the final moderated text, joins complete.
- crash-loop: the drift stage made to exit at every start: backed off, marked failed
  past its crash budget (status file, /healthz degraded), the others keep answering.
- gateway: 100 streaming callers leaving early leave no one waiting; the broker
  stopped (SIGSTOP) for --pause-s gives 503s within the deadline, and the pipeline
  answers again after SIGCONT.

It ends with the matrix: case, check, count, PASS or FAIL.

    python loadtest/faults.py --cases poison,sigkill,scale

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 840 s); a case that cannot start in the time left is reported NOT RUN. Ctrl-C or
SIGTERM stops every process it started and prints what was measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import fault_cases
import fault_outages
import orjson
from fault_cases import Gateway, Row
from harness import Deadline, add_limit_arg, free_port, run_limited, supervised

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from kllm.testing.scripted_engine import scripted_engine

LIMIT_S = 840
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""
CASES = ("poison", "sigkill", "scale", "crash-loop", "gateway")
QUOTA_RPM = 20
REPLICAS = {"ingestion": 2, "inference": 2, "moderation": 2, "feedback": 2, "gateway": 2}
"""Two processes of every stage that can have them (retrieval owns the embedded Qdrant,
drift needs every event of a tenant). The gateway replicas share one port: a caller's
retry after one is killed reaches the other."""


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    p.add_argument("--rate", type=float, default=4, help="requests/s of the plain callers")
    p.add_argument("--settle", type=float, default=6, help="seconds between kills and scalings")
    p.add_argument("--poison", type=int, default=2000, help="malformed records to publish")
    p.add_argument("--pause-s", type=float, default=10, help="how long the broker is stopped")
    p.add_argument(
        "--recovery-timeout-s",
        type=float,
        default=60,
        help="a stage not answering again this long after its kill counts as not recovered",
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    return run_limited(lambda deadline: _main(args, cases, deadline), args.limit_s)


def _main(args: argparse.Namespace, cases: list[str], deadline: Deadline) -> int:
    port = free_port()
    keys = Path(tempfile.mkdtemp()) / "keys.json"
    store = KeyStore(keys)
    gw = Gateway(f"http://127.0.0.1:{port}", store.create("faults")[1])
    quota_key = store.create("faults-quota")[1]
    rows: list[Row] = []
    restarter = threading.Event()
    try:
        with scripted_engine() as script:
            env = {
                "KLLM_GATEWAY_PORT": str(port),
                "KLLM_GATEWAY_KEYS_FILE": str(keys),
                "KLLM_MODELS": orjson.dumps(
                    [{"name": "scripted", "engine": "openai", "url": script, "slots": 8}]
                ).decode(),
                "KLLM_GATEWAY_MODELS": '["scripted"]',
                "KLLM_QUOTAS": orjson.dumps({"faults-quota": {"rpm": QUOTA_RPM}}).decode(),
                "KLLM_SESSION_TIMEOUT_MS": "3000",
                "KLLM_HEARTBEAT_INTERVAL_MS": "500",
                # A crash loop meets its budget in seconds, not minutes.
                "KLLM_RESTART_BUDGET": "3",
                "KLLM_RESTART_BACKOFF_S": "0.5",
            }
            with supervised(env=env, replicas=REPLICAS) as (bootstrap, sup):

                def keep_restarting() -> None:
                    while not restarter.is_set():
                        with fault_cases.SUPERVISING:
                            sup.restart_crashed()
                            sup.write_status()
                        restarter.wait(0.2)

                restarting = threading.Thread(target=keep_restarting, daemon=True)
                restarting.start()
                try:
                    for case in cases:
                        print(f"case {case}", flush=True)
                        rows += _run(case, args, sup, bootstrap, gw, quota_key, deadline)
                finally:
                    # Before the pipeline stops: a restart during its teardown would start
                    # a stage again (into a log folder already removed).
                    restarter.set()
                    restarting.join(5)
    finally:
        restarter.set()
        _report(rows, cases)
    return 0 if rows and all(r.ok for r in rows) and {r.case for r in rows} >= set(cases) else 1


def _run(
    case: str,
    args: argparse.Namespace,
    sup: Supervisor,
    bootstrap: str,
    gw: Gateway,
    quota_key: str,
    deadline: Deadline,
) -> list[Row]:
    if deadline.left() < 60:
        return [Row(case, "case", "NOT RUN (time limit)", False)]
    if case == "poison":
        return fault_cases.poison(sup, bootstrap, gw, deadline.within(180), args.poison)
    if case == "sigkill":
        return fault_cases.kill_each(
            sup, gw, deadline, args.rate, args.settle, args.recovery_timeout_s
        )
    if case == "scale":
        return fault_cases.scale(
            sup, bootstrap, gw, deadline, args.rate, QUOTA_RPM, quota_key, args.settle
        )
    if case == "crash-loop":
        return fault_outages.crash_loop(sup, gw, deadline, args.rate)
    return fault_outages.gateway(bootstrap, gw, deadline, args.pause_s)


def _report(rows: list[Row], cases: list[str]) -> None:
    print("\n| case | check | measured | |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.check} | {r.value} | {'PASS' if r.ok else 'FAIL'} |")
    missing = [c for c in cases if c not in {r.case for r in rows}]
    if missing:
        print(f"NOT RUN: {', '.join(missing)}")


if __name__ == "__main__":
    sys.exit(main())
