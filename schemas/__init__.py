"""Versioned wire messages.

Every message travels as an orjson object carrying ``schema`` (its name) and
``v`` (its version). :func:`decode` checks both before validating the fields,
so a consumer answers bad input with a precise reason instead of crashing.
"""

from schemas.codec import SchemaError, decode, encode, peek_field, peek_request_id, registry
from schemas.messages import (
    ChatTurn,
    Chunk,
    Citation,
    DeadLetter,
    Document,
    DocumentIndexed,
    DriftAlert,
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
    Usage,
)

__all__ = [
    "ChatTurn",
    "Chunk",
    "Citation",
    "DeadLetter",
    "Document",
    "DocumentIndexed",
    "DriftAlert",
    "Feedback",
    "FeedbackEnriched",
    "Generation",
    "InferenceJob",
    "Message",
    "ModerationEvent",
    "Request",
    "Response",
    "RetrievalContext",
    "SchemaError",
    "TokenDelta",
    "Usage",
    "decode",
    "encode",
    "peek_field",
    "peek_request_id",
    "registry",
]
