"""Versioned wire messages.

Every message travels as an orjson object carrying ``schema`` (its name) and
``v`` (its version). :func:`decode` checks both before validating the fields,
so a consumer answers bad input with a precise reason instead of crashing.
"""

from schemas.chat import (
    ChatTurn,
    FunctionCall,
    ResponseFormat,
    Sampling,
    Tool,
    ToolCall,
)
from schemas.codec import SchemaError, decode, encode, peek_field, peek_request_id, registry
from schemas.embeddings import EmbeddingRequest, Embeddings
from schemas.messages import (
    Chunk,
    Citation,
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
    "EmbeddingRequest",
    "Embeddings",
    "Evaluation",
    "Feedback",
    "FeedbackEnriched",
    "FunctionCall",
    "Generation",
    "InferenceJob",
    "Message",
    "ModerationEvent",
    "Request",
    "Response",
    "ResponseFormat",
    "RetrievalContext",
    "Sampling",
    "SchemaError",
    "TokenDelta",
    "Tool",
    "ToolCall",
    "Usage",
    "decode",
    "encode",
    "peek_field",
    "peek_request_id",
    "registry",
]
