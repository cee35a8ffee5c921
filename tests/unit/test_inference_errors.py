"""Engine errors as callers see them (issue 13): a prompt too long for the model's
context is not retried and not held against the model; retries are jittered; the
engines' errors name no upstream address and quote no upstream body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx
import pytest

from kllm.adapters.engines.chat_chunks import ChunkReader
from kllm.adapters.engines.openai_http import OpenAIHttpEngine
from kllm.core.errors import ContextLengthError, EngineError
from processors.inference import (
    NO_OPTIONS,
    SAMPLING_FIELDS,
    EngineEvent,
    Generator,
    Options,
    Router,
)
from schemas import Generation, InferenceJob
from schemas.chat import ChatTurn
from tests.unit.conftest import FakeEngine
from tests.unit.test_inference import FakeSleep

MakeJob = Callable[..., InferenceJob]


@dataclass
class TooLong:
    """An engine that refuses every prompt as longer than its context."""

    model: str = "small-context"
    slots: int = 1
    honours: frozenset[str] = SAMPLING_FIELDS
    calls: list[int] = field(default_factory=list)

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]:
        self.calls.append(max_tokens)
        raise ContextLengthError("prompt of 9000 tokens, context of 8192")
        yield  # an async generator, like every engine


def _generation(gen: Generator, job: InferenceJob) -> Generation:
    outcome = asyncio.run(gen.run(job))
    message = outcome.emits[0].message
    assert isinstance(message, Generation)
    return message


def test_a_prompt_too_long_is_not_retried_nor_held_against_the_model(make_job: MakeJob) -> None:
    engine, fallback = TooLong(), FakeEngine(model="fallback")
    router = Router(
        {engine.model: engine, fallback.model: fallback},
        default=engine.model,
        fallback=fallback.model,
        failure_threshold=1,
    )
    gen = Generator(router, max_attempts=3, backoff_s=0.0)
    for _ in range(3):
        g = _generation(gen, make_job())
        assert (g.finish_reason, g.attempts) == ("context_length", 1)
        assert g.error and "context" in g.error
    assert len(engine.calls) == 3  # one attempt per request, no retries
    assert fallback.calls == []  # the same prompt is the caller's to shorten
    assert not router.is_open(engine.model)  # one failure would have opened it


def test_retries_back_off_with_jitter(make_job: MakeJob, monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = FakeSleep()
    monkeypatch.setattr(asyncio, "sleep", sleep)
    draws = iter([0.0, 0.5])
    router = Router({"m": FakeEngine(model="m", fail_times=2)}, default="m")
    gen = Generator(router, max_attempts=3, backoff_s=1.0, jitter=lambda: next(draws))
    assert _generation(gen, make_job()).error is None
    assert sleep.delays == [0.5, 1.5]  # half of 1 s + nothing; half of 2 s + a quarter


def _engine(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAIHttpEngine:
    engine = OpenAIHttpEngine("http://10.1.2.3:8000", "m")
    engine._client = httpx.AsyncClient(
        base_url="http://10.1.2.3:8000", transport=httpx.MockTransport(handler)
    )
    return engine


async def _drain(engine: OpenAIHttpEngine) -> list[EngineEvent]:
    return [e async for e in engine.stream([ChatTurn(role="user", content="q")], 8)]


@pytest.mark.parametrize(
    "status,body",
    [
        (400, b'{"error": {"message": "This model\'s maximum context length is 2048 tokens"}}'),
        (400, b'{"error": {"type": "exceed_context_size_error", "message": "too long"}}'),
    ],
)
def test_an_http_engine_says_when_the_prompt_is_too_long(status: int, body: bytes) -> None:
    engine = _engine(lambda _r: httpx.Response(status, content=body))
    with pytest.raises(ContextLengthError):
        asyncio.run(_drain(engine))


def test_http_engine_errors_name_no_upstream_address_and_quote_no_body() -> None:
    secret = b'{"error": "internal: token sk-live-123 at http://10.1.2.3:8000/admin"}'
    for handler in (
        lambda _r: httpx.Response(500, content=secret),
        lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)),
    ):
        with pytest.raises(EngineError) as info:
            asyncio.run(_drain(_engine(handler)))
        assert not isinstance(info.value, ContextLengthError)
        assert "10.1.2.3" not in str(info.value) and "sk-live" not in str(info.value)


def test_an_error_chunk_about_the_context_is_a_context_length_error() -> None:
    reader = ChunkReader()
    chunk = {"error": {"type": "exceed_context_size_error", "message": "exceeds the context"}}
    with pytest.raises(ContextLengthError):
        reader.deltas(chunk)
    with pytest.raises(EngineError):
        reader.deltas({"error": {"message": "slot unavailable"}})


def test_log_probabilities_are_gathered_across_chunks() -> None:
    reader = ChunkReader()
    for token, logprob in (("Ka", -0.5), ("fka", -0.25)):
        top = [{"id": 7, "token": token, "logprob": logprob, "bytes": [75]}]
        content = [{"id": 7, "token": token, "logprob": logprob, "top_logprobs": top}]
        choice = {"delta": {"content": token}, "logprobs": {"content": content}}
        reader.deltas({"choices": [choice]})
    logprobs = reader.finish().logprobs
    assert [(t.token, t.logprob) for t in logprobs] == [("Ka", -0.5), ("fka", -0.25)]
    assert logprobs[0].top_logprobs[0].token == "Ka"


def test_unreadable_log_probabilities_are_an_engine_error() -> None:
    bad = {"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [{"token": 1}]}}]}
    with pytest.raises(EngineError, match="unreadable log probabilities"):
        ChunkReader().deltas(bad)
