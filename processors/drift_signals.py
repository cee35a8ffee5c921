"""What the drift stage reads off each stream, and what it does with it.

Signals per (tenant, model): from each question as ingestion passed it on, its
length and its embedding's distance to the tenant's reference; from each
inference job, the best retrieval score; from each response, latency, time to
first token and whether moderation blocked it; from joined feedback, the
rating, and the feedback model's error on it; from each online evaluation, the answer's
groundedness. Streams are keyed by the model
the request named ("default" when it named none) for request-side signals and
by the model that answered for the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from processors.base import Emit
from processors.drift import Alert, DriftMonitor, Observation, PromptReference, rating_score
from schemas import (
    DriftAlert,
    Evaluation,
    FeedbackEnriched,
    InferenceJob,
    Message,
    Request,
    Response,
)
from topics import DRIFT_ALERTS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]


def feedback_features(r: FeedbackEnriched) -> dict[str, float]:
    """What the feedback model predicts a negative rating from."""
    return {
        "prompt_chars": math.log1p(len(r.prompt or "")),
        "answer_chars": math.log1p(len(r.answer or "")),
        "top_score": r.top_score if r.top_score is not None else 0.0,
        "latency": math.log1p(r.pipeline_ms or 0.0),
        "cached": float(r.cached),
        "redacted": float(r.verdict == "redacted"),
        "blocked": float(r.verdict == "blocked"),
        "injection": r.injection_score or 0.0,
    }


@dataclass
class EmbedBudget:
    """At most ``per_s`` prompts embedded per second: a token bucket holding up to one
    second's worth. Embedding every prompt cost the drift stage half a core at 30
    requests/s on a shared host; a sample tells a distribution's drift as well."""

    per_s: float
    tokens: float = 0.0
    at: float | None = None

    def take(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` prompts may be embedded at ``now``."""
        elapsed = self.per_s if self.at is None else (now - self.at) * self.per_s
        self.tokens = min(self.per_s, self.tokens + max(0.0, elapsed))
        self.at = now
        granted = min(wanted, int(self.tokens + 1e-9))  # 0.3 s x 10/s is 2.999...: three
        self.tokens -= granted
        return granted


def spread(items: Sequence[Request], k: int) -> list[Request]:
    """``k`` of ``items``, evenly spaced."""
    n = len(items)
    return [items[i * n // k] for i in range(k)] if k < n else list(items)


@dataclass
class DriftStage:
    """Messages in, alerts out; ``monitor`` and ``reference`` are the checkpointed state.
    ``budget``: embed only a sample of the prompts at high rates (None: every prompt)."""

    monitor: DriftMonitor
    reference: PromptReference
    embed: Embed
    budget: EmbedBudget | None = None

    def process_batch(self, messages: Sequence[Message], now: float) -> list[Emit]:
        """``now``: when responses, which carry no time of their own, were read."""
        requests = [m for m in messages if isinstance(m, Request)]
        if self.budget is not None:
            requests = spread(requests, self.budget.take(len(requests), now))
        vectors = self.embed([r.prompt for r in requests]) if requests else []
        distance = {
            r.request_id: self.reference.distance(r.tenant, r.model or DEFAULT_MODEL, v)
            for r, v in zip(requests, vectors, strict=True)
        }
        alerts: list[Alert] = []
        for m in messages:
            for obs in self._observations(m, distance, now):
                alerts.extend(self.monitor.update(obs))
            if isinstance(m, FeedbackEnriched) and m.status == "joined":
                alerts.extend(
                    self.monitor.learn_feedback(
                        m.tenant,
                        m.model or DEFAULT_MODEL,
                        feedback_features(m),
                        m.rating <= 2,
                        m.request_id,
                        m.feedback_at,
                    )
                )
        for a in alerts:
            log.warning(
                "drift alert",
                extra={
                    "alert": f"{a.tenant}/{a.model}",
                    "signal": a.signal,
                    "detector": a.detector,
                },
            )
        return [Emit(DRIFT_ALERTS, f"{a.tenant}/{a.model}", to_message(a)) for a in alerts]

    @staticmethod
    def _observations(
        m: Message, distance: dict[str, float | None], now: float
    ) -> list[Observation]:
        if isinstance(m, Request):
            model = m.model or DEFAULT_MODEL
            obs = [
                Observation(
                    m.tenant, model, "prompt_length", len(m.prompt), m.request_id, m.created_at
                )
            ]
            d = distance.get(m.request_id)
            if d is not None:
                obs.append(
                    Observation(m.tenant, model, "prompt_distance", d, m.request_id, m.created_at)
                )
            return obs
        if isinstance(m, InferenceJob):
            r = m.request
            top = max((c.score for c in m.context.chunks), default=0.0)
            model = r.model or DEFAULT_MODEL
            return [
                Observation(r.tenant, model, "retrieval_top_score", top, r.request_id, r.created_at)
            ]
        if isinstance(m, Response):
            return _response_observations(m, now)
        if isinstance(m, Evaluation) and m.source == "primary" and m.groundedness is not None:
            # Shadow answers are a candidate's, not the live model's: no live alert on them.
            return [
                Observation(
                    m.tenant, m.model, "groundedness", m.groundedness, m.request_id, m.evaluated_at
                )
            ]
        if isinstance(m, FeedbackEnriched) and m.status == "joined":
            score = rating_score(m.rating)
            model = m.model or DEFAULT_MODEL
            return [
                Observation(m.tenant, model, "feedback_score", score, m.request_id, m.feedback_at)
            ]
        return []


def _response_observations(r: Response, at: float) -> list[Observation]:
    if r.error is not None or r.cached:
        return []  # failures and cache hits say nothing about the model's behaviour
    obs = [
        Observation(r.tenant, r.model, "latency_ms", r.pipeline_ms, r.request_id, at),
        Observation(r.tenant, r.model, "blocked", float(r.verdict == "blocked"), r.request_id, at),
    ]
    if r.ttft_ms is not None:
        obs.append(Observation(r.tenant, r.model, "ttft_ms", r.ttft_ms, r.request_id, at))
    return obs


def to_message(a: Alert) -> DriftAlert:
    return DriftAlert(
        tenant=a.tenant,
        model=a.model,
        signal=a.signal,
        detector=a.detector,
        before=a.before,
        after=a.after,
        sample_request_ids=list(a.sample_request_ids),
        detected_at=a.at,
    )
