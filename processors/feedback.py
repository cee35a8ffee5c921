"""Feedback joined with what it rates, for data teams: a stateful join by request id.

Four streams keyed by request id meet here: the request as ingestion passed it
on (redacted prompt, template), its inference job (what retrieval found), its
response (moderated answer, timings, cost) and feedback on it. The first three
leave a compact record in keyed state for ``ttl_s``; feedback that finds an
answer there is emitted joined. Feedback that finds none (an unknown request
id, or one older than the TTL) is an orphan: emitted too, marked and with the
reason, and counted, never dropped. The comment is the one free text entering
here, so it is redacted before it leaves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from processors.admission import KeyedState
from processors.base import Emit, Rejected
from processors.guardrails import Redactor
from schemas import Feedback, FeedbackEnriched, InferenceJob, Request, Response
from topics import FEEDBACK_ENRICHED

DEFAULT_TTL_S = 7 * 24 * 3600.0
log = logging.getLogger(__name__)


@dataclass
class JoinCounts:
    joined: int = 0
    orphans: int = 0


class FeedbackJoin:
    def __init__(self, redactor: Redactor | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.redactor = redactor
        self.ttl = timedelta(seconds=ttl_s)
        self.counts = JoinCounts()

    def on_request(self, request: Request, state: KeyedState) -> list[Emit]:
        state.set(
            "request",
            {
                "tenant": request.tenant,
                "model": request.model,
                "prompt": request.prompt,  # redacted by ingestion before this topic
                "messages": [
                    m.model_dump(mode="json", exclude_defaults=True) | {"role": m.role}
                    for m in request.messages
                ],  # every turn redacted likewise
                "template": request.template,
                "pii": list(request.pii),
                "injection_score": request.injection_score,
                "created_at": request.created_at,
            },
            ttl=self.ttl,
        )
        return []

    def on_job(self, job: InferenceJob, state: KeyedState) -> list[Emit]:
        chunks = job.context.chunks
        retrieval = {
            "chunk_ids": [c.chunk_id for c in chunks],
            "top_score": max((c.score for c in chunks), default=None),
        }
        state.set("retrieval", retrieval, ttl=self.ttl)
        return []

    def on_response(self, response: Response, state: KeyedState) -> list[Emit]:
        state.set(
            "response",
            {
                "tenant": response.tenant,
                "model": response.model,
                "answer": response.text,
                "tool_calls": [c.model_dump(mode="json") for c in response.tool_calls],
                "verdict": response.verdict,
                "finish_reason": response.finish_reason,
                "template": response.template,
                "policy": response.policy,
                "cached": response.cached,
                "pipeline_ms": response.pipeline_ms,
                "engine_ms": response.engine_ms,
                "ttft_ms": response.ttft_ms,
                "usage": response.usage.model_dump(),
                "cost_usd": response.cost_usd,
            },
            ttl=self.ttl,
        )
        return []

    def on_feedback(self, feedback: Feedback, state: KeyedState) -> list[Emit]:
        response: dict[str, Any] | None = state.get("response")
        if response is not None and response["tenant"] != feedback.tenant:
            raise Rejected(
                f"feedback from tenant {feedback.tenant!r} on a request of another tenant",
                code="invalid_request",
                notify=False,
            )
        comment = feedback.comment
        if comment and self.redactor is not None:
            comment = self.redactor.redact(comment).text
        base: dict[str, Any] = {
            "request_id": feedback.request_id,
            "tenant": feedback.tenant,
            "rating": feedback.rating,
            "label": feedback.label,
            "comment": comment,
            "feedback_at": feedback.created_at,
        }
        if response is None:
            self.counts.orphans += 1
            log.warning(
                "orphan feedback",
                extra={"request_id": feedback.request_id, "orphans": self.counts.orphans},
            )
            reason = "no answer known for this request id (unknown, or older than the join's TTL)"
            enriched = FeedbackEnriched(status="orphan", reason=reason, **base)
        else:
            self.counts.joined += 1
            enriched = FeedbackEnriched(
                status="joined",
                **base,
                **_joined(state.get("request"), state.get("retrieval"), response),
            )
        return [Emit(FEEDBACK_ENRICHED, feedback.request_id, enriched)]


def _joined(
    request: dict[str, Any] | None, retrieval: dict[str, Any] | None, response: dict[str, Any]
) -> dict[str, Any]:
    request = request or {}
    retrieval = retrieval or {}
    return {
        "model": response["model"] or request.get("model"),
        "prompt": request.get("prompt"),
        "messages": request.get("messages", []),
        "answer": response["answer"],
        "tool_calls": response.get("tool_calls", []),
        "verdict": response["verdict"],
        "finish_reason": response["finish_reason"],
        "template": response["template"] or request.get("template"),
        "policy": response["policy"],
        "cached": response["cached"],
        "chunk_ids": retrieval.get("chunk_ids", []),
        "top_score": retrieval.get("top_score"),
        "prompt_pii": request.get("pii", []),
        "injection_score": request.get("injection_score"),
        "requested_at": request.get("created_at"),
        "pipeline_ms": response["pipeline_ms"],
        "engine_ms": response["engine_ms"],
        "ttft_ms": response["ttft_ms"],
        "usage": response["usage"],
        "cost_usd": response["cost_usd"],
    }
