"""Where a request's time goes, from the span files of a traced run.

Reads ``<run_dir>/traces`` (written with ``KLLM_TRACE_EXPORT=file``) and, over every
request whose trace reached the moderation stage, reports per stage: the wait
before it (from the end of the span that produced its input to the start of its
own span: broker round trip, consumer fetch, queueing behind other records) and
its work (its span). Percentiles in milliseconds.

    python loadtest/trace_breakdown.py .kllm
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from harness import pct

from kllm.cli.trace import SpanRow, read_spans
from kllm.runtime.tracing import TRACES_DIR

CHAIN = ("gateway", "ingestion", "retrieval", "inference", "moderation")


def _stage(span: SpanRow) -> str:
    return "gateway" if span.service == "kllm-gateway" else span.name.removesuffix(" process")


def breakdown(spans: list[SpanRow]) -> dict[str, tuple[list[float], list[float]]]:
    """stage -> (waits before it, its work), in ms, over complete request traces."""
    by_trace: dict[str, dict[str, SpanRow]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, {}).setdefault(_stage(s), s)
    out: dict[str, tuple[list[float], list[float]]] = {st: ([], []) for st in CHAIN}
    for stages in by_trace.values():
        if not all(st in stages for st in CHAIN):
            continue
        out["gateway"][1].append(stages["gateway"].ms)  # the whole round trip
        for before, st in itertools.pairwise(CHAIN):
            # A stage's input was produced as the span before it ended; the gateway's
            # span lasts the whole round trip, and it publishes as it starts.
            produced = stages[before].start if before == "gateway" else stages[before].end
            out[st][0].append((stages[st].start - produced) * 1000)
            out[st][1].append(stages[st].ms)
    return out


def report(run_dir: Path) -> tuple[int, str]:
    """How many complete request traces the run dir's span files hold, and the table."""
    table = breakdown(read_spans(run_dir / TRACES_DIR))
    lines = [f"{'stage':11} {'wait p50':>9} {'p99':>8} {'work p50':>9} {'p99':>8}  (ms)"]
    for st, (waits, work) in table.items():
        lines.append(
            f"{st:11} {pct(waits, 0.5):9.1f} {pct(waits, 0.99):8.1f} "
            f"{pct(work, 0.5):9.1f} {pct(work, 0.99):8.1f}"
        )
    return len(table["moderation"][1]), "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="the pipeline's run directory (KLLM_RUN_DIR)")
    n, table = report(p.parse_args().run_dir)
    print(f"{n} complete request traces")
    print(table)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
