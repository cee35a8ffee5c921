"""orjson encoding with a schema/version envelope, and decoding with precise reasons."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from kllm.core.errors import PipelineError
from schemas.embeddings import EmbeddingRequest, Embeddings
from schemas.messages import (
    DeadLetter,
    Document,
    DocumentIndexed,
    DriftAlert,
    Evaluation,
    Feedback,
    FeedbackEnriched,
    Generation,
    InferenceJob,
    Message,
    ModerationEvent,
    Request,
    Response,
    RetrievalContext,
    TokenDelta,
)

M = TypeVar("M", bound=Message)

_MODELS: tuple[type[Message], ...] = (
    Request,
    RetrievalContext,
    InferenceJob,
    Generation,
    Response,
    ModerationEvent,
    Feedback,
    FeedbackEnriched,
    DriftAlert,
    Evaluation,
    DeadLetter,
    TokenDelta,
    Document,
    DocumentIndexed,
    EmbeddingRequest,
    Embeddings,
)

registry: dict[tuple[str, int], type[Message]] = {(m.SCHEMA, m.VERSION): m for m in _MODELS}
# Earlier versions still read during a rollout, by the model that upgrades them.
registry[(Request.SCHEMA, 1)] = Request  # a v1 prompt is one user turn


class SchemaError(PipelineError):
    """A payload is not a valid message; ``reason`` says precisely why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(message: Message) -> bytes:
    body: dict[str, Any] = {"schema": message.SCHEMA, "v": message.VERSION}
    body.update(message.model_dump(mode="json", by_alias=True))
    return orjson.dumps(body)


def _parse_object(data: bytes | str) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise SchemaError(f"payload must be a JSON object, got {type(body).__name__}")
    return body


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "missing":
            parts.append(f"missing field '{where}'")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        else:
            parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)


def decode(data: bytes | str, expected: type[M]) -> M:
    """Decode ``data`` as ``expected``'s schema at any registered version."""
    body = _parse_object(data)
    name, version = body.pop("schema", None), body.pop("v", None)
    if name is None:
        raise SchemaError("missing field 'schema'")
    if name != expected.SCHEMA:
        raise SchemaError(f"expected schema '{expected.SCHEMA}', got '{name}'")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"missing or non-integer field 'v' (schema version), got {version!r}")
    model = registry.get((name, version))
    if model is None:
        known = sorted(v for (n, v) in registry if n == name)
        raise SchemaError(f"unknown schema version {version} for '{name}' (supported: {known})")
    if (name, version) == (Request.SCHEMA, 1) and "prompt" not in body:
        # Version 1 carried one prompt; its producers know nothing of messages.
        raise SchemaError("missing field 'prompt'")
    try:
        message = model.model_validate(body)
    except ValidationError as exc:
        raise SchemaError(_describe(exc)) from exc
    if not isinstance(message, expected):
        raise SchemaError(f"version {version} of '{name}' cannot be read as {expected.__name__}")
    return message


def peek_field(data: bytes | str | None, name: str) -> str | None:
    """Best-effort string field of a payload that may not be valid, also looking
    inside a nested ``request``; for logs and DLQ records."""
    if not data:
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    value = body.get(name)
    if value is None and isinstance(body.get("request"), dict):
        value = body["request"].get(name)
    return value if isinstance(value, str) else None


def peek_request_id(data: bytes | str | None) -> str | None:
    return peek_field(data, "request_id")
