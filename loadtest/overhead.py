"""Pipeline overhead at fixed rates: end-to-end time minus the engine's own time.

One pipeline (embedded broker, every stage a process, response cache off, a
scripted engine that answers at once), open-loop load through the gateway at each
rate in turn (default 10, 50 and 200 requests/s) with openloop's prompt mix. Every
request is traced, and each rate's row comes with where the time went: per stage,
the wait before it (broker round trip, fetch, queueing) and its work.

    python loadtest/overhead.py --rates 10 50 200 --seconds 15

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 480 s). Each rate sends for --seconds and then waits at most --drain-s for
its answers; a rate the pipeline cannot keep up with stops there, its row marked
INCOMPLETE (requests not sent, answers still outstanding), and the next rate runs. A
rate with no time left is reported as NOT RUN. Ctrl-C or SIGTERM stops every process
it started and prints the rows measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Deadline, add_limit_arg, pct, run_limited
from openloop import Phase, Sample, _pipeline, run
from trace_breakdown import breakdown

from kllm.cli.trace import read_spans
from kllm.runtime.tracing import TRACES_DIR

LIMIT_S = 480
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


@dataclass
class Row:
    phase: Phase
    shed: int
    overhead: list[float]
    table: dict[str, tuple[list[float], list[float]]]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rates", type=float, nargs="+", default=[10, 50, 200])
    p.add_argument("--seconds", type=float, default=15, help="duration of each rate")
    p.add_argument("--settle", type=float, default=10, help="idle seconds between rates")
    p.add_argument(
        "--drain-s",
        type=float,
        default=20,
        help="after sending, wait at most this long for a rate's last answers (default 20)",
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    rows: list[Row] = []
    skipped: list[float] = []
    try:
        with _pipeline("scripted", traced=True, cache=False) as (url, keys, model, run_dir):
            traces = run_dir / TRACES_DIR
            for n, rate in enumerate(args.rates):
                # Room for this rate: its seconds, the drain, and reading the spans.
                if deadline.left() < args.seconds + 5:
                    skipped = args.rates[n:]
                    break
                since = time.time()
                phase = Phase(rate, args.seconds)
                try:
                    until = deadline.within(args.seconds + args.drain_s)
                    asyncio.run(run(url, keys, model, rate, args.seconds, until, phase))
                finally:
                    rows.append(_row(phase, traces, since))
                print(
                    f"{rate:.0f}/s done: {len(_ok(phase))} answered, {rows[-1].shed} shed"
                    + (f"; {phase.note()}" if phase.note() else ""),
                    flush=True,
                )
                if n < len(args.rates) - 1:
                    time.sleep(min(args.settle, deadline.left()))
    finally:
        if rows:
            print(report(rows))
        if skipped:
            print(f"NOT RUN (time limit): rates {', '.join(f'{r:.0f}/s' for r in skipped)}")
    return 0 if all(r.phase.complete for r in rows) and not skipped else 1


def _ok(phase: Phase) -> list[Sample]:
    return [s for s in phase.samples if s.status == 200]


def _row(phase: Phase, traces: Path, since: float) -> Row:
    time.sleep(1.5)  # the stages export their spans every half second
    table = breakdown([s for s in read_spans(traces) if s.start >= since])
    overhead = [s.e2e_ms - s.engine_ms for s in _ok(phase) if s.engine_ms is not None]
    return Row(phase, sum(s.status == 429 for s in phase.samples), overhead, table)


def report(rows: list[Row]) -> str:
    lines = [
        "rate   answered/s  shed(429)  overhead p50 / p99 ms   stage waits p50 (ms): "
        "ingestion retrieval inference moderation",
    ]
    for row in rows:
        rate, shed, overhead, table = row.phase.rate, row.shed, row.overhead, row.table
        answered = len(_ok(row.phase)) / row.phase.seconds
        waits = "  ".join(
            f"{pct(table[s][0], 0.5):8.1f}"
            for s in ("ingestion", "retrieval", "inference", "moderation")
        )
        lines.append(
            f"{rate:5.0f}  {answered:10.1f}  {shed:9d}  "
            f"{pct(overhead, 0.5):9.1f} / {pct(overhead, 0.99):8.1f}   {waits}"
        )
        if row.phase.note():
            lines.append(f"       {row.phase.note()}")
    lines.append("stage work p50 / p99 (ms), per rate:")
    for row in rows:
        rate, table = row.phase.rate, row.table
        work = "  ".join(
            f"{s} {pct(table[s][1], 0.5):.1f}/{pct(table[s][1], 0.99):.1f}"
            for s in ("ingestion", "retrieval", "inference", "moderation")
        )
        lines.append(f"{rate:5.0f}  {work}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
