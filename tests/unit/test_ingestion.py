from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError

from kllm.core.errors import PipelineError
from processors import Emit, Rejected
from processors.ingestion import Ingestion, IngestionPolicy
from schemas import Request
from topics import RETRIEVAL

MakeRequest = Callable[..., Request]
NOW = 2000.0


def _one(out: list[Emit]) -> Request:
    assert len(out) == 1
    (emit,) = out
    assert emit.topic is RETRIEVAL
    assert isinstance(emit.message, Request)
    assert emit.key == emit.message.request_id
    return emit.message


def test_forwards_normalised_request(make_request: MakeRequest) -> None:
    req = make_request(prompt="  What is Kafka?\n", request_id="abc")
    out = _one(Ingestion().process(req, now=NOW))
    assert out.prompt == "What is Kafka?"
    assert out.max_tokens == IngestionPolicy().default_max_tokens == 64
    assert out.request_id == "abc"
    assert out.tenant == req.tenant
    assert out.created_at == req.created_at
    assert req.prompt == "  What is Kafka?\n"  # the input is not mutated


def test_explicit_max_tokens_kept(make_request: MakeRequest) -> None:
    out = _one(Ingestion().process(make_request(max_tokens=17), now=NOW))
    assert out.max_tokens == 17


def test_custom_policy_default(make_request: MakeRequest) -> None:
    policy = IngestionPolicy(default_max_tokens=5)
    assert _one(Ingestion(policy).process(make_request(), now=NOW)).max_tokens == 5


@pytest.mark.parametrize("prompt", [" ", "\n\t  \n"])
def test_blank_prompt_rejected(make_request: MakeRequest, prompt: str) -> None:
    # A conversation without a question is not a request at all: refused when read.
    with pytest.raises(ValidationError, match="needs a user turn with text"):
        make_request(prompt=prompt)


def test_prompt_length_limit(make_request: MakeRequest) -> None:
    ing = Ingestion(IngestionPolicy(max_prompt_chars=10))
    assert _one(ing.process(make_request(prompt="x" * 10), now=NOW)).prompt == "x" * 10
    # surrounding whitespace does not count
    assert _one(ing.process(make_request(prompt="  " + "x" * 10 + "  "), now=NOW))
    with pytest.raises(Rejected) as info:
        ing.process(make_request(prompt="x" * 11), now=NOW)
    assert info.value.reason == "prompt has 11 characters, limit is 10"


def test_max_tokens_cap(make_request: MakeRequest) -> None:
    ing = Ingestion(IngestionPolicy(max_tokens_cap=100))
    assert _one(ing.process(make_request(max_tokens=100), now=NOW)).max_tokens == 100
    with pytest.raises(Rejected) as info:
        ing.process(make_request(max_tokens=101), now=NOW)
    assert info.value.reason == "max_tokens 101 exceeds the cap of 100"


def test_deadline(make_request: MakeRequest) -> None:
    ing = Ingestion()
    assert _one(ing.process(make_request(deadline_at=NOW + 0.001), now=NOW))
    assert _one(ing.process(make_request(deadline_at=None), now=NOW))
    with pytest.raises(Rejected, match=r"deadline passed 0\.000s"):
        ing.process(make_request(deadline_at=NOW), now=NOW)
    with pytest.raises(Rejected, match=r"deadline passed 1\.500s before ingestion"):
        ing.process(make_request(deadline_at=NOW - 1.5), now=NOW)


def test_deadline_uses_wall_clock_by_default(make_request: MakeRequest) -> None:
    with pytest.raises(Rejected):
        Ingestion().process(make_request(deadline_at=1.0))  # 1970
    assert _one(Ingestion().process(make_request(deadline_at=4e9)))  # 2096


def test_rejected_is_a_pipeline_error() -> None:
    err = Rejected("why")
    assert isinstance(err, PipelineError)
    assert err.reason == "why"
