"""Embedding requests and their answers: the pipeline's own embedding model, asked
over Kafka (the gateway's ``/v1/embeddings``, or any producer)."""

from __future__ import annotations

import time
from typing import ClassVar

from pydantic import Field, field_validator

from schemas.messages import Message, RequestId

MAX_INPUTS = 128
MAX_INPUT_CHARS = 32_000


class EmbeddingRequest(Message):
    SCHEMA: ClassVar[str] = "llm.embedding_request"
    VERSION: ClassVar[int] = 1

    request_id: RequestId = Field(min_length=1, max_length=128)
    tenant: str = Field(default="default", min_length=1, max_length=64)
    inputs: list[str] = Field(min_length=1, max_length=MAX_INPUTS)
    model: str | None = Field(default=None, max_length=128)
    """The embedding model asked for; None: the one the pipeline runs."""
    user: str | None = Field(default=None, max_length=256)
    created_at: float = Field(default_factory=time.time)
    deadline_at: float | None = None

    @field_validator("inputs")
    @classmethod
    def _inputs_have_text(cls, inputs: list[str]) -> list[str]:
        for i, text in enumerate(inputs):
            if not text.strip():
                raise ValueError(f"input {i} is empty")
            if len(text) > MAX_INPUT_CHARS:
                raise ValueError(f"input {i} is over {MAX_INPUT_CHARS} characters")
        return inputs


class Embeddings(Message):
    """One vector per input, in the request's order, each as base64 of its little-endian
    float32 values (OpenAI's ``encoding_format: base64``): a fourth the size of JSON
    floats, so a full request's answer fits one record."""

    SCHEMA: ClassVar[str] = "llm.embeddings"
    VERSION: ClassVar[int] = 1

    request_id: RequestId
    tenant: str
    model: str
    vectors_b64: list[str]
    prompt_tokens: int = 0
    embed_ms: float = 0.0
