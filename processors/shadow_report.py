"""The shadow report: a candidate's answers against the live ones, request by request.

``pairs`` matches each shadow evaluation with the live (primary) evaluation of the same
request; ``report`` gives, per metric, the pairs it applies to, both means, the mean
paired delta (shadow minus primary) with a percentile bootstrap interval, and the win
rate: the share of pairs where the shadow did better, of those that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

from schemas import Evaluation

__all__ = ["SHADOW_METRICS", "Pair", "Row", "ShadowMetric", "pairs", "report"]


@dataclass(frozen=True)
class Pair:
    primary: Evaluation
    shadow: Evaluation


@dataclass(frozen=True)
class ShadowMetric:
    name: str
    value: Callable[[Evaluation], float | None]
    higher_is_better: bool | None
    """None: reported without a winner (more tokens are neither better nor worse)."""


def _flag(b: bool) -> float:
    return float(b)


def _unsupported(e: Evaluation) -> float | None:
    return None if e.groundedness is None else _flag(e.unsupported)


SHADOW_METRICS = (
    ShadowMetric("groundedness", lambda e: e.groundedness, True),
    ShadowMetric("unsupported", _unsupported, False),
    ShadowMetric("citation_validity", lambda e: e.citation_validity, True),
    ShadowMetric("relevance", lambda e: e.relevance, True),
    ShadowMetric("error", lambda e: _flag(e.error is not None), False),
    ShadowMetric("latency_ms", lambda e: e.latency_ms if e.error is None else None, False),
    ShadowMetric("completion_tokens", lambda e: float(e.completion_tokens), None),
    ShadowMetric("cost_usd", lambda e: e.cost_usd, False),
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    metric: str
    pairs: int
    primary: float | None
    shadow: float | None
    delta: float | None
    low: float | None
    high: float | None
    win_rate: float | None
    primary_model: str
    shadow_model: str


def pairs(evaluations: Iterable[Evaluation], shadow_model: str | None = None) -> list[Pair]:
    """Each request's latest shadow evaluation (of ``shadow_model``, if given) with its
    latest primary one; requests without both are left out."""
    primary: dict[str, Evaluation] = {}
    shadow: dict[str, Evaluation] = {}
    for e in evaluations:
        if e.source == "primary":
            primary[e.request_id] = e
        elif shadow_model is None or e.model == shadow_model:
            shadow[e.request_id] = e
    return [Pair(primary[r], shadow[r]) for r in sorted(shadow.keys() & primary.keys())]


def _models(found: Sequence[Pair], side: str) -> str:
    return ", ".join(sorted({getattr(p, side).model for p in found})) or "-"


def report(
    found: Sequence[Pair], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[Row]:
    """One row per metric of ``SHADOW_METRICS`` (see the module docstring)."""
    rows = []
    for m in SHADOW_METRICS:
        both = [
            (a, b)
            for p in found
            if (a := m.value(p.primary)) is not None and (b := m.value(p.shadow)) is not None
        ]
        xs = np.array([a for a, _ in both], dtype=np.float64)
        ys = np.array([b for _, b in both], dtype=np.float64)
        delta = low = high = win = None
        if both:
            d = ys - xs
            delta = float(d.mean())
            low = high = delta
            if len(both) >= 3 and d.std() > 0:
                res = bootstrap(
                    (d,), np.mean, n_resamples=resamples, confidence_level=confidence,
                    method="percentile", random_state=seed,
                )  # fmt: skip
                low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
            decided = d[d != 0]
            if m.higher_is_better is not None and decided.size:
                better = decided > 0 if m.higher_is_better else decided < 0
                win = float(better.mean())
        rows.append(
            Row(
                m.name,
                len(both),
                float(xs.mean()) if both else None,
                float(ys.mean()) if both else None,
                delta,
                low,
                high,
                win,
                _models(found, "primary"),
                _models(found, "shadow"),
            )
        )
    return rows
