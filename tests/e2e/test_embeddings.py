"""/v1/embeddings through the real gateway, Kafka and the retrieval stage's embedder,
with the official `openai` client: the vectors match the embedder run directly."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder
from kllm.ops.supervisor import Supervisor
from tests.e2e.test_gateway import TIMEOUT, Gateway

MODEL = "all-minilm-l6-v2"
TEXTS = ["How do consumer groups rebalance?", "Qdrant stores vectors.", "é ✓ 漢字"]


@pytest.fixture(scope="module")
def gateway(pipeline: Supervisor) -> Gateway:
    return Gateway.of(pipeline)


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key("emb"), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def direct() -> list[list[float]]:
    return SentenceTransformerEmbedder().embed(TEXTS)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_vectors_match_the_embedder_run_directly(
    oai: openai.OpenAI, direct: list[list[float]], encoding: str
) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    fields = {"encoding_format": "float"} if encoding == "float" else {}
    got = oai.embeddings.create(model=MODEL, input=TEXTS, **fields)  # type: ignore[arg-type]
    assert [d.index for d in got.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (3, 384)
    assert np.max(np.abs(vectors - np.array(direct))) < 1e-5
    assert got.usage.prompt_tokens > len(TEXTS)


def test_one_string_is_one_vector(oai: openai.OpenAI, direct: list[list[float]]) -> None:
    got = oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    (only,) = got.data
    assert np.max(np.abs(np.array(only.embedding) - np.array(direct[0]))) < 1e-5


@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        ({"model": "text-embedding-3-small"}, 404, "not served"),
        ({"dimensions": 64}, 400, "dimensions:"),
        ({"input": ["ok", " "]}, 400, "input 1 is empty"),
    ],
)
def test_what_cannot_be_done_is_an_error_naming_it(
    gateway: Gateway, fields: dict[str, object], status: int, says: str
) -> None:
    body = {"model": MODEL, "input": ["ok"]} | fields
    auth = {"authorization": f"Bearer {gateway.key('emb')}"}
    got = httpx.post(f"{gateway.url}/v1/embeddings", json=body, headers=auth, timeout=TIMEOUT)
    assert got.status_code == status, got.text
    assert says in got.json()["error"]["message"], got.text
