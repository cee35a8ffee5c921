"""services.inference: build() and the async record handler, with a fake engine."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import pytest

from kllm.core.errors import ConfigError
from kllm.runtime.dispatch import RecordRef
from kllm.runtime.inflight import decoded
from processors import Emit
from schemas import (
    DeadLetter,
    Generation,
    InferenceJob,
    Request,
    Response,
    TokenDelta,
    Usage,
    encode,
)
from services.inference import STAGE, ModelSpec, Settings, build
from tests.unit.conftest import FakeEngine
from topics import GENERATIONS, INFERENCE, RESPONSES, TOKENS

MakeJob = Callable[..., InferenceJob]
MakeRequest = Callable[..., Request]
REF = RecordRef(INFERENCE, 0, 5, None)


def _settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {
        "models": [ModelSpec(name="fake", slots=3)],
        "default_max_tokens": 8,
        "retry_backoff_s": 0.0,
        "max_in_flight": 0,
    }
    base.update(kw)
    return Settings(**base)


def _handle(engine: FakeEngine, value: bytes, **kw: Any) -> tuple[list[Emit], list[Emit]]:
    """(returned emits, published emits) for one record."""
    generator, _ = build(_settings(**kw), engines={engine.model: engine})
    handler = decoded(STAGE, InferenceJob, generator.handle)  # as main() wires it
    published: list[Emit] = []

    async def main() -> list[Emit]:
        return await handler(REF, value, published.append)

    return asyncio.run(main()), published


def _letter(emit: Emit) -> DeadLetter:
    assert emit.topic == INFERENCE.dlq
    assert emit.topic.name == f"{INFERENCE.name}.dlq"
    assert isinstance(emit.message, DeadLetter)
    letter = emit.message
    assert letter.stage == "inference"
    assert (letter.source_topic, letter.partition, letter.offset) == (INFERENCE.name, 0, 5)
    assert letter.key is None
    return letter


# --- build --------------------------------------------------------------------------------


def test_capacity_is_the_default_engines_slots() -> None:
    engine = FakeEngine(model="fake", slots=3)
    generator, capacity = build(_settings(), engines={"fake": engine})
    assert capacity == 3
    assert generator.router.engines == {"fake": engine}
    assert generator.router.default == "fake"
    assert generator.default_max_tokens == 8


def test_capacity_follows_the_default_model() -> None:
    engines = {"a": FakeEngine(model="a", slots=2), "b": FakeEngine(model="b", slots=7)}
    models = [ModelSpec(name="a"), ModelSpec(name="b")]
    _, capacity = build(_settings(models=models, default_model="b"), engines=engines)
    assert capacity == 7


def test_max_in_flight_overrides_capacity() -> None:
    _, capacity = build(_settings(max_in_flight=11), engines={"fake": FakeEngine(model="fake")})
    assert capacity == 11


def test_build_passes_retry_prices_and_routing() -> None:
    engines = {"fake": FakeEngine(model="fake"), "spare": FakeEngine(model="spare")}
    settings = _settings(
        models=[
            ModelSpec(name="fake", input_price_per_mtok=2.0, output_price_per_mtok=10.0),
            ModelSpec(name="spare"),
        ],
        model_aliases={"best": "fake"},
        fallback_model="spare",
        max_attempts=5,
    )
    generator, _ = build(settings, engines=engines)
    assert generator.max_attempts == 5
    assert generator.prices["fake"].input_per_mtok == 2.0
    assert generator.prices["fake"].output_per_mtok == 10.0
    assert generator.router.plan("best") == ["fake", "spare"]


@pytest.mark.parametrize(
    "kw", [{"fallback_model": "ghost"}, {"default_model": "ghost"}, {"model_aliases": {"x": "y"}}]
)
def test_build_rejects_unserved_routes(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="routed to but not served"):
        build(_settings(**kw), engines={"fake": FakeEngine(model="fake")})


# --- handler ------------------------------------------------------------------------------


def test_valid_job_gives_one_generation(make_job: MakeJob) -> None:
    engine = FakeEngine(model="fake", pieces=["Kafka ", "is a log."])
    job = make_job()
    out, published = _handle(engine, encode(job))
    assert len(out) == 1
    assert out[0].topic is GENERATIONS
    assert out[0].key == "req-1"
    g = out[0].message
    assert isinstance(g, Generation)
    assert g.text == "Kafka is a log."
    assert g.model == "fake"
    assert g.finish_reason == "stop"
    assert g.error is None
    assert g.request == job.request
    assert published == []  # not a streaming request
    assert engine.calls == [(job.messages, 8)]  # default_max_tokens from the settings


def test_generation_is_priced_from_the_settings(make_job: MakeJob) -> None:
    engine = FakeEngine(model="fake", usage=Usage(prompt_tokens=1000, completion_tokens=100))
    spec = ModelSpec(name="fake", input_price_per_mtok=2.0, output_price_per_mtok=10.0)
    out, _ = _handle(engine, encode(make_job()), models=[spec])
    assert isinstance(out[0].message, Generation)
    assert out[0].message.cost_usd == pytest.approx(0.003)


def test_streaming_request_publishes_deltas(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine(model="fake", pieces=["a", "b", "c"])
    out, published = _handle(engine, encode(make_job(make_request(stream=True))))
    assert [e.topic for e in published] == [TOKENS, TOKENS, TOKENS, TOKENS]
    assert all(e.key == "req-1" for e in published)
    deltas = [e.message for e in published if isinstance(e.message, TokenDelta)]
    assert len(deltas) == len(published)
    assert [(d.index, d.text, d.model, d.final) for d in deltas] == [
        (0, "a", "fake", False),
        (1, "b", "fake", False),
        (2, "c", "fake", False),
        (3, "", "fake", True),  # closes the stream for moderation
    ]
    # The generation itself is returned (published once acked), not published early.
    assert [e.topic for e in out] == [GENERATIONS]
    assert isinstance(out[0].message, Generation)
    assert out[0].message.text == "abc"


@pytest.mark.parametrize(
    "value", [b"\x00\xffgarbage", b"", b"[1, 2]", b'{"schema": "llm.request"}']
)
def test_garbage_is_dead_lettered(value: bytes) -> None:
    engine = FakeEngine(model="fake")
    out, published = _handle(engine, value)
    assert len(out) == 1  # no request id to answer
    letter = _letter(out[0])
    assert letter.reason.startswith("SchemaError: ")
    assert letter.request_id is None
    assert base64.b64decode(letter.payload_b64) == value
    assert out[0].key == ""
    assert published == []
    assert engine.calls == []


def test_unknown_model_dead_lettered_and_answered(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    engine = FakeEngine(model="fake")
    value = encode(make_job(make_request(model="gpt-9", stream=True)))
    out, published = _handle(engine, value)
    assert [e.topic for e in out] == [INFERENCE.dlq, RESPONSES]
    letter = _letter(out[0])
    assert letter.reason.startswith("Rejected: model 'gpt-9' is not served here")
    assert letter.request_id == "req-1"
    assert base64.b64decode(letter.payload_b64) == value
    assert out[0].key == "req-1"
    response = out[1].message
    assert isinstance(response, Response)
    assert out[1].key == "req-1"
    assert response.request_id == "req-1"
    assert response.tenant == "acme"
    assert response.finish_reason == "error"
    assert f"Rejected: {response.error}" == letter.reason  # the caller is told without the class
    assert published == []
    assert engine.calls == []


def test_engine_failure_gives_error_generation_and_dead_letter(make_job: MakeJob) -> None:
    engine = FakeEngine(model="fake", always_fail=True)
    value = encode(make_job())
    out, published = _handle(engine, value, max_attempts=2)
    assert [e.topic for e in out] == [GENERATIONS, INFERENCE.dlq]
    g = out[0].message
    assert isinstance(g, Generation)
    assert g.finish_reason == "error"
    assert g.attempts == 2
    assert g.text == ""
    letter = _letter(out[1])
    assert letter.reason.startswith("engine failed after 2 attempts")
    assert letter.reason == g.error
    assert letter.request_id == "req-1"
    assert base64.b64decode(letter.payload_b64) == value
    assert len(engine.calls) == 2
    assert published == []
