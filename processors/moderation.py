"""Moderation: score the generated text and decide what the caller may read."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from processors.base import Emit
from schemas import Generation, ModerationEvent, Response
from schemas.messages import Citation, Verdict
from topics import MODERATION_EVENTS, RESPONSES

BLOCKED_TEXT = "This answer was withheld by output moderation."


class TextClassifier(Protocol):
    """Scores texts in [0, 1]; higher means more likely to violate the policy."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


class Moderator:
    def __init__(self, classifier: TextClassifier, block_threshold: float = 0.8) -> None:
        self.classifier = classifier
        self.block_threshold = block_threshold

    def process(self, generation: Generation, *, now: float | None = None) -> list[Emit]:
        request = generation.request
        scores: dict[str, float] = {}
        reasons: list[str] = []
        verdict: Verdict = "allowed"
        if generation.text:
            (score,) = self.classifier.score([generation.text])
            scores[self.classifier.name] = score
            if score >= self.block_threshold:
                verdict = "blocked"
                reasons.append(
                    f"{self.classifier.name} score {score:.2f} >= {self.block_threshold}"
                )
        now = time.time() if now is None else now
        response = Response(
            request_id=request.request_id,
            tenant=request.tenant,
            text=BLOCKED_TEXT if verdict == "blocked" else generation.text,
            verdict=verdict,
            reasons=reasons,
            model=generation.model,
            finish_reason="content_filter" if verdict == "blocked" else generation.finish_reason,
            usage=generation.usage,
            citations=[
                Citation(chunk_id=c.chunk_id, doc_id=c.doc_id, score=c.score)
                for c in generation.chunks
            ],
            engine_ms=generation.latency_ms,
            ttft_ms=generation.ttft_ms,
            cost_usd=generation.cost_usd,
            pipeline_ms=max(0.0, (now - request.created_at) * 1000),
            error=generation.error,
            error_code="engine_error" if generation.error else None,
            template=request.template,
        )
        event = ModerationEvent(
            request_id=request.request_id,
            tenant=request.tenant,
            verdict=verdict,
            scores=scores,
            reasons=reasons,
        )
        return [
            Emit(RESPONSES, request.request_id, response),
            Emit(MODERATION_EVENTS, request.request_id, event),
        ]
