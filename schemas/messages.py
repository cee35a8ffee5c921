"""Message models. Each top-level message names its schema and version.

A breaking change adds a new class with ``VERSION = n + 1`` registered beside
the old one, so consumers can keep reading both during a rollout.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.chat import (
    INSTRUCTION_ROLES,
    ChatTurn,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    check_tool_choice,
)

Verdict = Literal["allowed", "redacted", "blocked"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(_Model):
    """A top-level message: what travels on a topic."""

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int]


def _now() -> float:
    return time.time()


RequestId = str


class Request(Message):
    """A conversation from a front end, as published to the request topic.

    Version 1 carried one ``prompt``; it is still read, as one user turn, and
    ``Request(prompt=...)`` builds the same. ``prompt`` reads the latest user turn.
    """

    SCHEMA: ClassVar[str] = "llm.request"
    VERSION: ClassVar[int] = 2

    request_id: RequestId = Field(min_length=1, max_length=128)
    tenant: str = Field(default="default", min_length=1, max_length=64)
    messages: list[ChatTurn] = Field(min_length=1, max_length=256)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    sampling: Sampling = Field(default_factory=Sampling)
    response_format: ResponseFormat | None = None
    tools: list[Tool] = Field(default_factory=list, max_length=128)
    tool_choice: ToolChoice | None = None
    n: int = Field(default=1, ge=1, le=8)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = Field(default=None, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=128)
    stream: bool = False
    created_at: float = Field(default_factory=_now)
    deadline_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Set by ingestion's guardrails: which template variant builds the prompt, what
    # kinds of PII were redacted from it, and how likely it is an injection attempt.
    template: str | None = None
    pii: list[str] = Field(default_factory=list)
    injection_score: float | None = None
    flagged: bool = False
    instructions_dropped: int = 0
    """The client's system and developer turns left out because the template locks them."""
    trimmed_turns: int = 0
    """Set by retrieval: the oldest turns left out so the conversation fits the prompt."""

    @model_validator(mode="before")
    @classmethod
    def _prompt_is_one_user_turn(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" in data:
            data = dict(data)
            prompt = data.pop("prompt")
            if "messages" in data:
                raise ValueError("give either 'prompt' (version 1) or 'messages', not both")
            data["messages"] = [{"role": "user", "content": prompt}]
        return data

    @field_validator("messages")
    @classmethod
    def _has_question(cls, messages: list[ChatTurn]) -> list[ChatTurn]:
        if not any(m.role == "user" and m.content.strip() for m in messages):
            raise ValueError("the conversation needs a user turn with text")
        return messages

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> Request:
        check_tool_choice(self.tools, self.tool_choice)
        return self

    @classmethod
    def from_prompt(cls, prompt: str, **fields: Any) -> Request:
        """A one-question conversation (what version 1 carried)."""
        return cls(messages=[ChatTurn(role="user", content=prompt)], **fields)

    @property
    def prompt(self) -> str:
        """The latest user turn: the question retrieval searches for."""
        return next(
            m.content for m in reversed(self.messages) if m.role == "user" and m.content.strip()
        )

    def instructions(self) -> str | None:
        """The caller's own system and developer turns, one per line; None without any."""
        texts = [m.content for m in self.messages if m.role in INSTRUCTION_ROLES]
        return "\n".join(texts) or None


class Chunk(_Model):
    """A retrieved passage with its provenance and similarity score."""

    chunk_id: str
    doc_id: str
    text: str
    score: float
    source: str = ""


class RetrievalContext(Message):
    SCHEMA: ClassVar[str] = "llm.retrieval_context"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    chunks: list[Chunk] = Field(default_factory=list)
    embed_ms: float = 0.0
    search_ms: float = 0.0


class InferenceJob(Message):
    """A request with its retrieved context and the prompt built from it."""

    SCHEMA: ClassVar[str] = "llm.inference_job"
    VERSION: ClassVar[int] = 1

    request: Request
    context: RetrievalContext
    messages: list[ChatTurn] = Field(min_length=1)


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Choice(_Model):
    """One more answer to a request that asked for ``n`` > 1 (the first is the message's
    own text)."""

    index: int = Field(ge=1)
    text: str
    finish_reason: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    verdict: Verdict | None = None
    """Set by moderation, which judges each choice on its own."""


class Generation(Message):
    """The engine's unmoderated output for one request."""

    SCHEMA: ClassVar[str] = "llm.generation"
    VERSION: ClassVar[int] = 1

    request: Request
    chunks: list[Chunk] = Field(default_factory=list)
    text: str
    model: str
    finish_reason: str
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cost_usd: float = 0.0
    attempts: int = 1
    error: str | None = None
    fallback: bool = False
    """Answered by the fallback model, not the one the request was routed to."""
    alternatives: list[Choice] = Field(default_factory=list)
    """Choices 1..n-1 of a request for n > 1."""
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    """The answer's tokens with their log probabilities, when the request asked."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """The caller's tools the model called; the finish reason is then "tool_calls"."""


class TokenDelta(Message):
    """One streamed piece of an answer. On llm.tokens: straight from the engine, for the
    moderation stage only. On llm.tokens.moderated: a moderated window, for callers.
    The last one of a stream has ``final`` set and its finish reason."""

    SCHEMA: ClassVar[str] = "llm.token_delta"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    index: int = Field(ge=0)
    text: str
    model: str
    final: bool = False
    finish_reason: str | None = None
    # What moderation needs to judge the stream (set by inference on llm.tokens).
    tenant: str = "default"
    template: str | None = None
    injection_flagged: bool = False
    prompt: str | None = None
    """The request's prompt, on the first delta only, when ingestion flagged it."""
    instructions: str | None = None
    """The caller's own system and developer turns, on the first delta only."""
    # Set by moderation on llm.tokens.moderated.
    verdict: Verdict | None = None
    reasons: list[str] = Field(default_factory=list)


class Citation(_Model):
    chunk_id: str
    doc_id: str
    score: float


class Response(Message):
    """What the caller receives: the moderated answer."""

    SCHEMA: ClassVar[str] = "llm.response"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str
    text: str
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    model: str
    finish_reason: str
    usage: Usage = Field(default_factory=Usage)
    citations: list[Citation] = Field(default_factory=list)
    engine_ms: float = 0.0
    ttft_ms: float | None = None
    cost_usd: float = 0.0
    pipeline_ms: float = 0.0
    error: str | None = None
    error_code: str | None = None
    """Machine-readable kind of error, e.g. quota_exceeded, prompt_blocked, invalid_request."""
    retry_after_s: float | None = None
    template: str | None = None
    policy: str | None = None
    """The moderation policy version the answer was judged under."""
    cached: bool = False
    instructions_dropped: int = 0
    """The caller's system and developer turns the template left out."""
    trimmed_turns: int = 0
    """The oldest conversation turns left out so it fits the model's prompt."""
    fallback: bool = False
    """Answered by the fallback model."""
    alternatives: list[Choice] = Field(default_factory=list)
    """Choices 1..n-1 of a request for n > 1, each moderated."""
    logprobs: list[TokenLogprob] | None = None
    """The answer's tokens with their log probabilities, when asked for and the answer
    reads as generated; None when moderation changed its text (they would not match)."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """The caller's tools the model called, their arguments moderated."""
    answer_mode: Literal["generated", "quoted", "declined"] = "generated"
    """How the text was reached: the model's answer, quoted passages in its place (it
    was unsupported), or a decline (the passages do not answer the question)."""
    groundedness: float | None = Field(default=None, ge=0.0, le=1.0)
    """The supported share of the generated answer's claims; None when not scored."""


class ModerationEvent(Message):
    SCHEMA: ClassVar[str] = "llm.moderation_event"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str
    verdict: Verdict
    scores: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)
    checks: list[str] = Field(default_factory=list)
    """The checks that found something: toxicity, pii, policy, echo."""
    policy: str | None = None
    window: int | None = None
    """For a streamed answer: which moderated window; None for the whole answer."""


class Feedback(Message):
    SCHEMA: ClassVar[str] = "llm.feedback"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str = "default"
    rating: int = Field(ge=1, le=5)
    label: str | None = None
    comment: str | None = Field(default=None, max_length=4000)
    created_at: float = Field(default_factory=_now)


class FeedbackEnriched(Message):
    """Feedback joined with what it rates: the (redacted) question, the retrieval, the
    (moderated) answer and how it was served. Free of PII: the prompt was redacted at
    ingestion, the answer by moderation, the comment by the join."""

    SCHEMA: ClassVar[str] = "llm.feedback_enriched"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str
    status: Literal["joined", "orphan"]
    reason: str | None = None
    """Why an orphan has nothing joined: unknown request id, or older than the join's TTL."""
    rating: int
    label: str | None = None
    comment: str | None = None
    feedback_at: float
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatTurn] = Field(default_factory=list)
    """The whole (redacted) conversation the answer continues; its last user turn is
    ``prompt``."""
    answer: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """The answer's calls of the caller's tools."""
    verdict: Verdict | None = None
    finish_reason: str | None = None
    template: str | None = None
    policy: str | None = None
    cached: bool = False
    chunk_ids: list[str] = Field(default_factory=list)
    top_score: float | None = None
    prompt_pii: list[str] = Field(default_factory=list)
    injection_score: float | None = None
    requested_at: float | None = None
    pipeline_ms: float | None = None
    engine_ms: float | None = None
    ttft_ms: float | None = None
    usage: Usage | None = None
    cost_usd: float | None = None


class Document(Message):
    """A change to the live corpus: upsert (replaces every chunk of the document) or delete."""

    SCHEMA: ClassVar[str] = "llm.document"
    VERSION: ClassVar[int] = 1

    tenant: str = Field(min_length=1, max_length=64)
    doc_id: str = Field(min_length=1, max_length=512)
    op: Literal["upsert", "delete"] = "upsert"
    text: str = ""
    source: str = ""
    version: int = Field(default=0, ge=0)
    """Grows with each change of the document; an older version never replaces a newer one."""
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=_now)


class DocumentIndexed(Message):
    """The indexer's receipt: the document is searchable (or gone) from now on."""

    SCHEMA: ClassVar[str] = "llm.document_indexed"
    VERSION: ClassVar[int] = 1

    tenant: str
    doc_id: str
    version: int
    op: Literal["upsert", "delete", "skipped"]
    chunks: int = 0
    reason: str = ""


class DriftAlert(Message):
    SCHEMA: ClassVar[str] = "llm.drift_alert"
    VERSION: ClassVar[int] = 1

    tenant: str
    model: str
    signal: str
    detector: str
    before: dict[str, float] = Field(default_factory=dict)
    after: dict[str, float] = Field(default_factory=dict)
    sample_request_ids: list[RequestId] = Field(default_factory=list)
    detected_at: float = Field(default_factory=_now)


class Evaluation(Message):
    """One answer scored online by the evaluation stage (processors/online_eval.py):
    groundedness against its passages, citation validity, relevance to the question,
    and what it cost. ``source`` tells a live answer from a shadow model's."""

    SCHEMA: ClassVar[str] = "llm.evaluation"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str
    model: str
    template: str | None = None
    source: Literal["primary", "shadow"] = "primary"
    groundedness: float | None = Field(default=None, ge=0.0, le=1.0)
    """Supported share of the answer's claim sentences; None: no claims (or declined)."""
    unsupported: bool = False
    """Groundedness under the stage's threshold."""
    declined: bool = False
    claims: int = 0
    citation_validity: float | None = Field(default=None, ge=0.0, le=1.0)
    relevance: float | None = None
    """Cosine between the question and the answer (the pipeline's embedder)."""
    passages: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    evaluated_at: float = Field(default_factory=_now)


class DeadLetter(Message):
    """A record a stage could not process. Its payload is kept whole when it is small
    enough to replay from here (``payload_truncated`` False); a larger one keeps a prefix,
    with the size and SHA-256 of the whole, so the DLQ record itself always fits the
    broker. Records from before those fields have them unset."""

    SCHEMA: ClassVar[str] = "llm.dead_letter"
    VERSION: ClassVar[int] = 1

    stage: str
    reason: str
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    request_id: RequestId | None = None
    payload_b64: str
    payload_size: int | None = None
    payload_sha256: str | None = None
    payload_truncated: bool = False
    failed_at: float = Field(default_factory=_now)
