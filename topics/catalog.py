"""The topic catalog."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from schemas import (
    DeadLetter,
    Document,
    DocumentIndexed,
    DriftAlert,
    EmbeddingRequest,
    Embeddings,
    Evaluation,
    Feedback,
    FeedbackEnriched,
    Generation,
    InferenceJob,
    Message,
    ModerationEvent,
    Request,
    Response,
    TokenDelta,
)

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """One topic: how it is created and what travels on it."""

    name: str
    partitions: int
    key: str
    schema: type[Message] | None
    retention_ms: int = 7 * _DAY_MS
    cleanup_policy: str = "delete"
    has_dlq: bool = False
    extra_configs: dict[str, str] = field(default_factory=dict)

    @property
    def configs(self) -> dict[str, str]:
        # retention.ms is always explicit: quixstreams reads it from topic metadata.
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": self.cleanup_policy,
            **self.extra_configs,
        }

    @property
    def dlq(self) -> TopicSpec:
        if not self.has_dlq:
            raise KeyError(f"topic {self.name} declares no DLQ")
        return TopicSpec(
            name=f"{self.name}.dlq",
            partitions=1,
            key="request id (when readable)",
            schema=DeadLetter,
            retention_ms=30 * _DAY_MS,
        )


REQUESTS = TopicSpec("llm.requests", 4, "tenant", Request, has_dlq=True)
RETRIEVAL = TopicSpec("llm.retrieval", 4, "request id", Request, has_dlq=True)
INFERENCE = TopicSpec("llm.inference", 4, "request id", InferenceJob, has_dlq=True)
TOKENS = TopicSpec("llm.tokens", 4, "request id", TokenDelta, retention_ms=_DAY_MS)
MODERATED_TOKENS = TopicSpec(
    "llm.tokens.moderated", 4, "request id", TokenDelta, retention_ms=_DAY_MS
)
GENERATIONS = TopicSpec("llm.generations", 4, "request id", Generation, has_dlq=True)
RESPONSES = TopicSpec("llm.responses", 4, "request id", Response)
GENERATIONS_SHADOW = TopicSpec("llm.generations.shadow", 4, "request id", Generation)
"""A candidate model's answers to copies of live or replayed jobs: scored, never answered."""
MODERATION_EVENTS = TopicSpec("llm.moderation.events", 2, "request id", ModerationEvent)
DOCUMENTS = TopicSpec(
    "llm.documents", 2, "tenant/document id", Document, has_dlq=True, retention_ms=30 * _DAY_MS
)
DOCUMENTS_INDEXED = TopicSpec("llm.documents.indexed", 2, "tenant/document id", DocumentIndexed)
# As many partitions as the topics it is joined with (keyed alike): co-partitioned.
FEEDBACK = TopicSpec("llm.feedback", 4, "request id", Feedback, has_dlq=True)
FEEDBACK_ENRICHED = TopicSpec(
    "llm.feedback.enriched", 4, "request id", FeedbackEnriched, retention_ms=90 * _DAY_MS
)
DRIFT_ALERTS = TopicSpec("llm.drift.alerts", 1, "tenant/model", DriftAlert)
EVALUATIONS = TopicSpec("llm.evaluations", 4, "request id", Evaluation, retention_ms=30 * _DAY_MS)
EMBEDDING_REQUESTS = TopicSpec(
    "llm.embeddings.requests", 2, "request id", EmbeddingRequest, has_dlq=True
)
EMBEDDINGS = TopicSpec("llm.embeddings", 2, "request id", Embeddings, retention_ms=_DAY_MS)

_PRIMARY = (
    REQUESTS,
    RETRIEVAL,
    INFERENCE,
    TOKENS,
    MODERATED_TOKENS,
    GENERATIONS,
    RESPONSES,
    GENERATIONS_SHADOW,
    MODERATION_EVENTS,
    DOCUMENTS,
    DOCUMENTS_INDEXED,
    FEEDBACK,
    FEEDBACK_ENRICHED,
    DRIFT_ALERTS,
    EVALUATIONS,
    EMBEDDING_REQUESTS,
    EMBEDDINGS,
)

ALL: tuple[TopicSpec, ...] = _PRIMARY + tuple(t.dlq for t in _PRIMARY if t.has_dlq)


_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")


def inference_topic(pool: str = "") -> TopicSpec:
    """The job topic of an inference pool: one per group of workers serving the same
    models. The empty pool is the default topic; others are declared by configuration
    (``KLLM_INFERENCE_POOLS``) and provisioned with the rest."""
    if not pool:
        return INFERENCE
    if not _POOL_NAME.match(pool):
        raise ValueError(f"pool name {pool!r}: use 1-48 of a-z, 0-9, '-', '_'")
    return TopicSpec(
        f"{INFERENCE.name}.{pool}", INFERENCE.partitions, INFERENCE.key, InferenceJob, has_dlq=True
    )


def by_name(name: str) -> TopicSpec:
    for spec in ALL:
        if spec.name == name:
            return spec
    raise KeyError(f"no topic named {name!r} is declared")
