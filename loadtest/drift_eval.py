"""Drift monitor on synthetic streams: false alarms when nothing changes, delay when it does.

Per signal and seed, two streams of ``--events`` events through a fresh DriftMonitor
(default hyperparameters):

1. stationary: every alert is a false alarm (reported per 10,000 events);
2. shifted at event ``--events // 2``: alerts before the shift are false alarms too; the
   delay is the number of shifted events the stream had seen when the first alert after
   the shift fired ("-" when none did).

The synthetic signals (and their shifts) are those in ``SHIFTS``; the unit tests use the
same generators (kllm.testing.drift_streams).

    .venv/bin/python loadtest/drift_eval.py --seeds 10 --events 10000

Time limit: ends within --limit-s (default 300 s): in process, no broker or stages; a
signal not reached by the limit is reported NOT RUN.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from harness import Deadline, run_limited

from kllm.testing.drift_streams import SHIFTS, run
from processors.drift import DETECTORS, SIGNALS

LIMIT_S = 300
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


@dataclass(frozen=True)
class SeedResult:
    false_alarms: int  # alerts on the stationary stream
    early: int  # alerts on the shifted stream before its shift (false alarms too)
    delay: int | None  # shifted events seen at the first alert after the shift


def evaluate(signal: str, n: int, seed: int) -> SeedResult:
    """One seed of one signal: a stationary stream and a stream shifted at ``n // 2``."""
    shift_at = n // 2
    stationary = run(signal, n, seed)
    shifted = run(signal, n, seed + 10_000, shift_at)
    delays = [a.events_seen - shift_at for a in shifted if a.events_seen > shift_at]
    return SeedResult(
        false_alarms=len(stationary),
        early=sum(a.events_seen <= shift_at for a in shifted),
        delay=delays[0] if delays else None,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument(
        "--limit-s",
        type=float,
        default=LIMIT_S,
        help=f"the whole run ends within this (default {LIMIT_S})",
    )
    args = parser.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    n, seeds = args.events, args.seeds
    started = time.perf_counter()
    print(
        f"{seeds} seeds per signal, default DriftMonitor; FA: alerts on a stationary stream of "
        f"{n} events, per 10k events\n(early: alerts before the shift on the shifted stream, "
        f"all seeds); delay: events from the shift (after event {n // 2}) to the alert\n"
    )
    header = (
        f"{'signal':<21} {'detector':<13} {'FA/10k mean':>11} {'FA/10k max':>10} {'early':>5} "
        f"{'delay med':>9} {'delay max':>9} {'detected':>8}  shift"
    )
    print(header)
    print("-" * len(header))
    per_10k = 10_000 / n
    for signal in SIGNALS:
        if deadline.expired():
            print(f"{signal:<21} NOT RUN (time limit)")
            continue
        results = [evaluate(signal, n, seed) for seed in range(seeds)]
        fa = [r.false_alarms * per_10k for r in results]
        delays = [r.delay for r in results if r.delay is not None]
        med = f"{statistics.median(delays):.0f}" if delays else "-"
        worst = f"{max(delays)}" if delays else "-"
        detected = f"{len(delays)}/{seeds}"
        print(
            f"{signal:<21} {DETECTORS[signal]:<13} {statistics.mean(fa):>11.2f} {max(fa):>10.2f} "
            f"{sum(r.early for r in results):>5} {med:>9} {worst:>9} {detected:>8}  "
            f"{SHIFTS[signal]}"
        )
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
