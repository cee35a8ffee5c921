"""Feedback stage: joins llm.feedback with the request, retrieval and response it rates
(all keyed by request id) into llm.feedback.enriched, PII-free, for data teams."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kllm.adapters.guardrails.pii import PATTERN_ENTITIES as PII_ENTITIES
from kllm.runtime import logs, tracing
from kllm.runtime.dispatch import StageLogic, keyed_only
from kllm.runtime.quix import serve_join
from kllm.runtime.settings import StageSettings
from processors.feedback import DEFAULT_TTL_S, FeedbackJoin
from processors.guardrails import Redactor
from schemas import Feedback, InferenceJob, Request, Response
from topics import FEEDBACK, INFERENCE, RESPONSES, RETRIEVAL, TopicSpec

STAGE = "feedback"


class Settings(StageSettings):
    feedback_ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0)
    """How long a request's record waits for feedback; later feedback is an orphan."""
    comment_pii_entities: list[str] = Field(default_factory=lambda: list(PII_ENTITIES))
    """Presidio entities redacted from feedback comments; [] keeps comments as written."""


def build(
    settings: Settings, *, redactor: Redactor | None = None
) -> list[tuple[TopicSpec, StageLogic[Any]]]:
    if redactor is None and settings.comment_pii_entities:
        from kllm.adapters.guardrails.pii import PresidioRedactor

        redactor = PresidioRedactor(settings.comment_pii_entities)
    join = FeedbackJoin(redactor, settings.feedback_ttl_s)
    # Only llm.feedback is this stage's own: the others' stages dead-letter their records.
    return [
        (RETRIEVAL, StageLogic(STAGE, Request, keyed_only, join.on_request, owner=False)),
        (INFERENCE, StageLogic(STAGE, InferenceJob, keyed_only, join.on_job, owner=False)),
        (RESPONSES, StageLogic(STAGE, Response, keyed_only, join.on_response, owner=False)),
        (FEEDBACK, StageLogic(STAGE, Feedback, keyed_only, process_keyed=join.on_feedback)),
    ]


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    serve_join(settings, STAGE, build(settings))


if __name__ == "__main__":
    main()
