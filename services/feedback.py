"""Feedback stage: joins llm.feedback with the request, retrieval and response it rates
(all keyed by request id) into llm.feedback.enriched, PII-free, for data teams."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kllm import logs
from kllm.errors import ConfigError
from kllm.settings import StageSettings
from processors.base import Emit
from processors.dispatch import StageLogic
from processors.feedback import DEFAULT_TTL_S, FeedbackJoin
from processors.guardrails import Redactor
from schemas import Feedback, InferenceJob, Message, Request, Response
from services.ingestion import PII_ENTITIES
from services.runtime import serve_join
from topics import FEEDBACK, INFERENCE, RESPONSES, RETRIEVAL, TopicSpec

STAGE = "feedback"


class Settings(StageSettings):
    feedback_ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0)
    """How long a request's record waits for feedback; later feedback is an orphan."""
    comment_pii_entities: list[str] = Field(default_factory=lambda: list(PII_ENTITIES))
    """Presidio entities redacted from feedback comments; [] keeps comments as written."""


def _keyed_only(_message: Message) -> list[Emit]:
    raise ConfigError("the feedback join runs only with keyed state")


def build(
    settings: Settings, *, redactor: Redactor | None = None
) -> list[tuple[TopicSpec, StageLogic[Any]]]:
    if redactor is None and settings.comment_pii_entities:
        from kllm.adapters.pii import PresidioRedactor

        redactor = PresidioRedactor(settings.comment_pii_entities)
    join = FeedbackJoin(redactor, settings.feedback_ttl_s)
    return [
        (RETRIEVAL, StageLogic(STAGE, Request, _keyed_only, process_keyed=join.on_request)),
        (INFERENCE, StageLogic(STAGE, InferenceJob, _keyed_only, process_keyed=join.on_job)),
        (RESPONSES, StageLogic(STAGE, Response, _keyed_only, process_keyed=join.on_response)),
        (FEEDBACK, StageLogic(STAGE, Feedback, _keyed_only, process_keyed=join.on_feedback)),
    ]


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    serve_join(settings, STAGE, build(settings))


if __name__ == "__main__":
    main()
