"""Drift monitor on synthetic streams: false alarms when nothing changes, delay when it does.

Per signal and seed, two streams of ``--events`` events through a fresh DriftMonitor
(default hyperparameters):

1. stationary: every alert is a false alarm (reported per 10,000 events);
2. shifted at event ``--events // 2``: alerts before the shift are false alarms too; the
   delay is the number of shifted events the stream had seen when the first alert after
   the shift fired ("-" when none did).

The synthetic signals (and their shifts) are those in ``SHIFTS``; the unit tests use the
same generators.

    .venv/bin/python loadtest/drift_eval.py --seeds 10 --events 10000
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

from processors.drift import DETECTORS, SIGNALS, Alert, DriftMonitor, Observation, rating_score

SHIFTS = {
    "prompt_distance": "mean +0.2 (beta, 0.30 -> 0.50, sd 0.08)",
    "prompt_length": "x2 (lognormal tokens, median 120, sigma 0.8)",
    "retrieval_top_score": "mean -0.2 (beta, 0.72 -> 0.52, sd 0.10)",
    "latency_ms": "x2 (lognormal, median 800 ms, sigma 0.35)",
    "ttft_ms": "x2 (lognormal, median 150 ms, sigma 0.5)",
    "blocked": "rate 0.02 -> 0.10",
    "feedback_score": "mean rating 4.2 -> 3.0 (scaled (r-1)/4)",
    "feedback_model_error": "P(negative | features) relation inverted",
}

RATINGS = (1, 2, 3, 4, 5)
RATING_P = (0.03, 0.04, 0.08, 0.40, 0.45)  # mean 4.2
RATING_P_SHIFTED = (0.15, 0.20, 0.30, 0.20, 0.15)  # mean 3.0


def _beta(rng: random.Random, mean: float, concentration: float) -> float:
    return rng.betavariate(mean * concentration, (1 - mean) * concentration)


def sample(signal: str, rng: random.Random, shifted: bool) -> float:
    """One synthetic value of ``signal``, before or after the shift."""
    factor = 2.0 if shifted else 1.0
    if signal == "prompt_distance":
        return _beta(rng, 0.50 if shifted else 0.30, 31.8)
    if signal == "prompt_length":
        return float(max(1, round(factor * rng.lognormvariate(math.log(120), 0.8))))
    if signal == "retrieval_top_score":
        return _beta(rng, 0.52 if shifted else 0.72, 19.2)
    if signal == "latency_ms":
        return factor * rng.lognormvariate(math.log(800), 0.35)
    if signal == "ttft_ms":
        return factor * rng.lognormvariate(math.log(150), 0.5)
    if signal == "blocked":
        return float(rng.random() < (0.10 if shifted else 0.02))
    if signal == "feedback_score":
        weights = RATING_P_SHIFTED if shifted else RATING_P
        return rating_score(rng.choices(RATINGS, weights)[0])
    raise ValueError(f"no generator for {signal!r}")


def feedback_example(rng: random.Random, shifted: bool) -> tuple[dict[str, float], bool]:
    """Request features and whether its feedback is negative; the shift inverts the relation."""
    features = {"length": rng.gauss(0, 1), "top_score": rng.gauss(0, 1), "latency": rng.gauss(0, 1)}
    sign = -1.0 if shifted else 1.0
    logit = -1.5 + sign * (2.0 * features["length"] - 1.5 * features["top_score"])
    return features, rng.random() < 1 / (1 + math.exp(-logit))


@dataclass(frozen=True)
class Event:
    """One step of a synthetic stream: an observation, or labelled feedback features."""

    index: int  # 1-based position in the stream
    request_id: str
    value: float = 0.0
    features: dict[str, float] | None = None
    negative: bool = False


def events(signal: str, n: int, seed: int, shift_at: int | None = None) -> Iterator[Event]:
    """``n`` events of ``signal``; those after the first ``shift_at`` come shifted."""
    rng = random.Random(f"{signal}:{seed}")
    for i in range(1, n + 1):
        shifted = shift_at is not None and i > shift_at
        rid = f"{signal[:4]}-{seed}-{i}"
        if signal == "feedback_model_error":
            features, negative = feedback_example(rng, shifted)
            yield Event(i, rid, features=features, negative=negative)
        else:
            yield Event(i, rid, value=sample(signal, rng, shifted))


def feed(
    monitor: DriftMonitor, signal: str, event: Event, tenant: str = "acme", model: str = "m"
) -> list[Alert]:
    """Feed one synthetic event to the monitor."""
    if event.features is not None:
        return monitor.learn_feedback(
            tenant, model, event.features, event.negative, event.request_id, float(event.index)
        )
    obs = Observation(tenant, model, signal, event.value, event.request_id, float(event.index))
    return monitor.update(obs)


def run(
    signal: str, n: int, seed: int, shift_at: int | None = None, monitor: DriftMonitor | None = None
) -> list[Alert]:
    """All alerts of one synthetic stream through ``monitor`` (a fresh default one if None)."""
    monitor = monitor or DriftMonitor()
    alerts: list[Alert] = []
    for event in events(signal, n, seed, shift_at):
        alerts.extend(feed(monitor, signal, event))
    return alerts


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
