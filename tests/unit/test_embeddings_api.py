"""/v1/embeddings bodies: what is refused by name, and the answer as floats or base64."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from processors import openai_embeddings as emb
from processors.base import Rejected
from processors.batching import Failed
from processors.embeddings import EmbeddingAnswerer, packed
from schemas import EmbeddingRequest, Embeddings


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "all-minilm-l6-v2", "input": "What is Kafka?"} | fields


def test_one_input_or_several_become_one_request() -> None:
    one = emb.to_embedding_request(
        emb.parse_embeddings_request(_body()), request_id="e", tenant="t", timeout_s=5
    )
    assert one.inputs == ["What is Kafka?"] and one.model == "all-minilm-l6-v2"
    several = emb.parse_embeddings_request(_body(input=["a", "b"]))
    assert several.inputs() == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "starts"),
    [
        ({"dimensions": 64}, "dimensions:"),
        ({"input": [1, 2, 3]}, "input: token arrays"),
        ({"input": ["x"] * 129}, "input: at most 128"),
        ({"encoding_format": "int8"}, "encoding_format:"),
        ({"input": []}, "input:"),
    ],
)
def test_what_cannot_be_done_is_refused_by_name(fields: dict[str, Any], starts: str) -> None:
    with pytest.raises(Rejected) as refused:
        emb.parse_embeddings_request(_body(**fields))
    assert str(refused.value).startswith(starts), str(refused.value)


def test_an_empty_input_is_refused_with_its_index() -> None:
    body = emb.parse_embeddings_request(_body(input=["fine", "  "]))
    with pytest.raises(Rejected, match="input 1 is empty"):
        emb.to_embedding_request(body, request_id="e", tenant="t", timeout_s=5)


def test_base64_is_little_endian_float32_as_openai_sends_it() -> None:
    vectors = [[0.25, -1.5], [3.0, 0.0]]
    answer = Embeddings(
        request_id="e",
        tenant="t",
        model="m",
        vectors_b64=[packed(v) for v in vectors],
        prompt_tokens=4,
    )
    floats = emb.embeddings_body(answer)
    assert [d["embedding"] for d in floats["data"]] == [[0.25, -1.5], [3.0, 0.0]]
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    sent = emb.embeddings_body(answer, "base64")["data"][1]["embedding"]
    assert np.frombuffer(base64.b64decode(sent), dtype="<f4").tolist() == [3.0, 0.0]


class _CountingEmbedder:
    dim = 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, texts: Any) -> list[list[float]]:
        self.calls.append(len(texts))
        return [[float(len(t)), 1.0] for t in texts]

    def count_tokens(self, text: str) -> int:
        return 1


def _asked(rid: str, n: int, model: str | None = None) -> EmbeddingRequest:
    return EmbeddingRequest(request_id=rid, inputs=["x"] * n, model=model)


def test_a_large_batch_is_embedded_a_part_at_a_time() -> None:
    embedder = _CountingEmbedder()
    answerer = EmbeddingAnswerer(embedder, "m", max_inputs=5)
    done = answerer.process_each([_asked("a", 3), _asked("b", 2), _asked("c", 1)])
    assert len(done) == 2 and embedder.calls == [5]  # "c" is read again later
    alone = answerer.process_each([_asked("big", 9)])
    assert len(alone) == 1 and embedder.calls == [5, 9]  # one request is never split


def test_a_batch_of_other_models_never_calls_the_embedder() -> None:
    embedder = _CountingEmbedder()
    (refused,) = EmbeddingAnswerer(embedder, "m").process_each([_asked("a", 1, "other")])
    assert isinstance(refused, Failed) and embedder.calls == []
