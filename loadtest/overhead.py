"""Pipeline overhead at fixed rates: end-to-end time minus the engine's own time.

One pipeline (embedded broker, every stage a process, response cache off, a
scripted engine that answers at once), open-loop load through the gateway at each
rate in turn (default 10, 50 and 200 requests/s) with openloop's prompt mix. Every
request is traced, and each rate's row comes with where the time went: per stage,
the wait before it (broker round trip, fetch, queueing) and its work.

    python loadtest/overhead.py --rates 10 50 200 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from harness import pct
from openloop import _pipeline, run
from trace_breakdown import breakdown

from kllm.cli.trace import read_spans
from kllm.runtime.tracing import TRACES_DIR


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rates", type=float, nargs="+", default=[10, 50, 200])
    p.add_argument("--seconds", type=float, default=15, help="duration of each rate")
    p.add_argument("--settle", type=float, default=10, help="idle seconds between rates")
    args = p.parse_args()
    rows = []
    with _pipeline("scripted", traced=True, cache=False) as (url, keys, model, run_dir):
        traces = run_dir / TRACES_DIR
        for rate in args.rates:
            since = time.time()
            samples = asyncio.run(run(url, keys, model, rate, args.seconds))
            time.sleep(1.5)  # the stages export their spans every half second
            table = breakdown([s for s in read_spans(traces) if s.start >= since])
            ok = [s for s in samples if s.status == 200]
            overhead = [s.e2e_ms - s.engine_ms for s in ok if s.engine_ms is not None]
            shed = sum(s.status == 429 for s in samples)
            rows.append((rate, len(ok) / args.seconds, shed, overhead, table))
            print(f"{rate:.0f}/s done: {len(ok)} answered, {shed} shed", flush=True)
            time.sleep(args.settle)
    print(report(rows))
    return 0


def report(
    rows: list[tuple[float, float, int, list[float], dict[str, tuple[list[float], list[float]]]]],
) -> str:
    lines = [
        "rate   answered/s  shed(429)  overhead p50 / p99 ms   stage waits p50 (ms): "
        "ingestion retrieval inference moderation",
    ]
    for rate, answered, shed, overhead, table in rows:
        waits = "  ".join(
            f"{pct(table[s][0], 0.5):8.1f}"
            for s in ("ingestion", "retrieval", "inference", "moderation")
        )
        lines.append(
            f"{rate:5.0f}  {answered:10.1f}  {shed:9d}  "
            f"{pct(overhead, 0.5):9.1f} / {pct(overhead, 0.99):8.1f}   {waits}"
        )
    lines.append("stage work p50 / p99 (ms), per rate:")
    for rate, *_, table in rows:
        work = "  ".join(
            f"{s} {pct(table[s][1], 0.5):.1f}/{pct(table[s][1], 0.99):.1f}"
            for s in ("ingestion", "retrieval", "inference", "moderation")
        )
        lines.append(f"{rate:5.0f}  {work}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
