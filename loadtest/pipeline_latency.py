"""Pipeline latency benchmark: end-to-end time versus the engine's own time.

Starts the embedded broker and every stage as separate processes (or uses
KLLM_BOOTSTRAP_SERVERS with a pipeline already running, with --external),
sends requests open-loop at a fixed rate, and reports end-to-end latency, the
engine's time, and the pipeline's overhead (end-to-end minus engine) as
percentiles, all measured in one run.

    python loadtest/pipeline_latency.py --requests 30 --rate 0.5 --max-tokens 24

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 600 s). Answers are awaited at most 60 s past the last request (and never past
the limit); requests still unanswered then are reported as lost. Ctrl-C or SIGTERM stops
every process it started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid

from harness import add_limit_arg, current, pct, run_limited, running

from kllm.runtime.kafka import TailReader, make_producer
from kllm.runtime.settings import KafkaSettings
from schemas import Request, Response, decode, encode
from topics import REQUESTS, RESPONSES

PROMPTS = (
    "What is Kafka used for in this pipeline?",
    "What happens to a malformed request?",
    "How are offsets committed?",
    "What does the moderation stage check?",
    "How do I scale the inference stage?",
)

LIMIT_S = 600
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


def run(bootstrap: str, n: int, rate: float, max_tokens: int) -> int:
    reader = TailReader(bootstrap, RESPONSES.name, {"fetch.wait.max.ms": 10})
    producer = make_producer(bootstrap, {"linger.ms": 0})
    sent: dict[str, float] = {}
    got: dict[str, tuple[float, Response]] = {}

    def receive() -> None:
        for key, value in reader.records(timeout_s=min(60 + n / rate, current().left())):
            if key in sent and key not in got:
                got[key] = (time.monotonic(), decode(value, Response))
                print(f"\r  answered {len(got)}/{n}", end="", file=sys.stderr, flush=True)
                if len(got) == n:
                    return

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    t0 = time.monotonic()
    for i in range(n):
        if current().expired():
            print(f"\nINCOMPLETE: time limit; {i} of {n} requests sent", file=sys.stderr)
            break
        time.sleep(max(0.0, min(t0 + i / rate - time.monotonic(), current().left())))
        req = Request(
            request_id=f"bench-{uuid.uuid4()}",
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=max_tokens,
        )
        sent[req.request_id] = time.monotonic()
        producer.produce(REQUESTS.name, key=req.tenant, value=encode(req))
        producer.poll(0)
    producer.flush(10)
    receiver.join(current().left() + 1)
    reader.close()
    print(file=sys.stderr)
    elapsed = time.monotonic() - t0
    e2e = [(got[k][0] - sent[k]) * 1000 for k in got]
    engine = [got[k][1].engine_ms for k in got]
    overhead = [a - b for a, b in zip(e2e, engine, strict=True)]
    tokens = sum(r.usage.completion_tokens for _, r in got.values())
    errors = sum(1 for _, r in got.values() if r.error)
    print(f"requests {n} at {rate}/s, answered {len(got)}, errors {errors}, lost {n - len(got)}")
    print(f"throughput {len(got) / elapsed:.2f} req/s, {tokens / elapsed:.1f} completion tok/s")
    print(f"{'ms':12} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}")
    for name, xs in (("end-to-end", e2e), ("engine", engine), ("overhead", overhead)):
        if xs:
            print(
                f"{name:12} {pct(xs, 0.5):8.1f} {pct(xs, 0.95):8.1f} {pct(xs, 0.99):8.1f} "
                f"{statistics.fmean(xs):8.1f}"
            )
    if e2e:
        print(
            f"engine share of end-to-end (median of ratios): "
            f"{statistics.median(b / a for a, b in zip(e2e, engine, strict=True)):.3f}"
        )
    return 0 if len(got) == n else 1


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=30, help="requests to send (default 30)")
    p.add_argument("--rate", type=float, default=0.5, help="requests per second (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default 24)")
    p.add_argument(
        "--external",
        action="store_true",
        help="use the running pipeline at KLLM_BOOTSTRAP_SERVERS instead of starting one",
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda _deadline: _main(args), args.limit_s)


def _main(args: argparse.Namespace) -> int:
    if args.external:
        return run(KafkaSettings().bootstrap(), args.requests, args.rate, args.max_tokens)
    with running() as bootstrap:
        return run(bootstrap, args.requests, args.rate, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
