"""OpenAI's embeddings wire format, mapped onto the pipeline's embedding messages.

Pure: a parsed body becomes an ``EmbeddingRequest``; its ``Embeddings`` answer
becomes OpenAI's list of embeddings, as floats or as base64 (little-endian float32,
as OpenAI encodes them).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processors.base import Rejected
from processors.embeddings import unpacked
from processors.openai_api import refuse_unsupported, validated
from schemas import EmbeddingRequest, Embeddings
from schemas.embeddings import MAX_INPUTS

REFUSED_FIELDS = {
    "dimensions": "the embedding model's dimension is fixed; shortened vectors are not made",
}


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(default=None, max_length=256)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_embeddings_request(body: Any) -> EmbeddingsBody:
    """The body, validated; Rejected naming the field otherwise. Token arrays (lists
    of integers) are refused: inputs are text here."""
    if isinstance(body, dict):
        refuse_unsupported(body, REFUSED_FIELDS)
        given = body.get("input")
        if isinstance(given, list) and any(not isinstance(x, str) for x in given):
            raise Rejected("input: token arrays are not supported; send text")
        if isinstance(given, list) and len(given) > MAX_INPUTS:
            raise Rejected(f"input: at most {MAX_INPUTS} inputs per request")
    return validated(EmbeddingsBody, body)


def to_embedding_request(
    body: EmbeddingsBody, *, request_id: str, tenant: str, timeout_s: float
) -> EmbeddingRequest:
    now = time.time()
    try:
        return EmbeddingRequest(
            request_id=request_id,
            tenant=tenant,
            inputs=body.inputs(),
            model=body.model,
            user=body.user,
            created_at=now,
            deadline_at=now + timeout_s,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Rejected(f"input: {first['msg']}") from exc


def embeddings_body(answer: Embeddings, encoding: str = "float") -> dict[str, Any]:
    """OpenAI's answer; base64 is passed on as the stage packed it (the same format)."""
    base64 = encoding == "base64"
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v if base64 else unpacked(v)}
            for i, v in enumerate(answer.vectors_b64)
        ],
        "model": answer.model,
        "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens},
        "kllm": {"request_id": answer.request_id, "embed_ms": answer.embed_ms},
    }
