"""Synthetic drift streams: per signal, values before and after a known shift.

Used by the unit and end-to-end drift tests and by ``loadtest/drift_eval.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from processors.base import Emit
from processors.drift import Alert, DriftMonitor, Observation, rating_score
from processors.drift_signals import DriftStage
from schemas import Message, Response

SHIFTS = {
    "prompt_distance": "mean +0.2 (beta, 0.30 -> 0.50, sd 0.08)",
    "prompt_length": "x2 (lognormal tokens, median 120, sigma 0.8)",
    "retrieval_top_score": "mean -0.2 (beta, 0.72 -> 0.52, sd 0.10)",
    "latency_ms": "x2 (lognormal, median 800 ms, sigma 0.35)",
    "ttft_ms": "x2 (lognormal, median 150 ms, sigma 0.5)",
    "blocked": "rate 0.02 -> 0.10",
    "feedback_score": "mean rating 4.2 -> 3.0 (scaled (r-1)/4)",
    "feedback_model_error": "P(negative | features) relation inverted",
    "groundedness": "mean -0.2 (beta, 0.70 -> 0.50, sd 0.12)",
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
    if signal == "groundedness":
        return _beta(rng, 0.50 if shifted else 0.70, 13.6)
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


# -- messages for the drift stage ---------------------------------------------------------

NOISE = (100.0, 110.0, 95.0, 105.0, 90.0, 115.0, 100.0, 98.0, 102.0, 108.0)
"""Ten latencies around 100 (mean 102.3), repeated every ten requests: a stationary stream
small enough to reason about; scale it to shift the stream."""


def latency_responses(
    lo: int, values: Callable[[int], float], n: int = 10, tenant: str = "acme", model: str = "m"
) -> list[Response]:
    """Responses ``r<lo>`` to ``r<lo + n - 1>``, request i taking ``values(i)`` ms, with no
    time to first token."""
    return [
        Response(
            request_id=f"r{i}",
            tenant=tenant,
            text="an answer",
            verdict="allowed",
            model=model,
            finish_reason="stop",
            pipeline_ms=values(i),
            ttft_ms=None,
        )
        for i in range(lo, lo + n)
    ]


def process_in_batches(
    stage: DriftStage,
    batch: Callable[[int], Sequence[Message]],
    start: int,
    end: int,
    step: int = 10,
) -> list[Emit]:
    """Run ``batch(lo)`` through the stage for lo = start, start + step, ... below end, each
    batch at ``now = lo``; the alerts they raise."""
    out: list[Emit] = []
    for lo in range(start, end, step):
        out.extend(stage.process_batch(list(batch(lo)), now=float(lo)))
    return out
