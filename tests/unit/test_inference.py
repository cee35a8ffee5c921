from __future__ import annotations

from collections.abc import Callable
from typing import Any

from processors.inference import Generator
from schemas import Generation, InferenceJob, Request, Usage
from topics import GENERATIONS


def _generation(out: list[Any], job: InferenceJob) -> Generation:
    assert len(out) == 1
    emit = out[0]
    assert emit.topic is GENERATIONS
    assert emit.key == job.request.request_id
    assert isinstance(emit.message, Generation)
    return emit.message


def test_success(engine_factory: Callable[..., Any], make_job: Callable[..., InferenceJob]) -> None:
    engine = engine_factory(text="Kafka is a log [1].", finish_reason="length")
    job = make_job()
    gen = _generation(Generator(engine).process(job), job)
    assert gen.text == "Kafka is a log [1]."
    assert gen.finish_reason == "length"
    assert gen.model == "fake-model"
    assert gen.usage == Usage(prompt_tokens=42, completion_tokens=7)
    assert gen.latency_ms == 12.5
    assert gen.ttft_ms == 3.25
    assert gen.error is None
    assert gen.request == job.request
    assert gen.chunks == job.context.chunks
    assert engine.calls == [(job.messages, 64)]


def test_max_tokens_from_request_or_default(
    engine_factory: Callable[..., Any],
    make_job: Callable[..., InferenceJob],
    make_request: Callable[..., Request],
) -> None:
    engine = engine_factory()
    Generator(engine, default_max_tokens=11).process(make_job())
    Generator(engine, default_max_tokens=11).process(make_job(make_request(max_tokens=300)))
    assert [m for _, m in engine.calls] == [11, 300]


def test_engine_error_becomes_error_generation(
    engine_factory: Callable[..., Any], make_job: Callable[..., InferenceJob]
) -> None:
    engine = engine_factory(fail_with="out of memory")
    job = make_job()
    gen = _generation(Generator(engine).process(job), job)
    assert gen.finish_reason == "error"
    assert gen.error == "engine error: out of memory"
    assert gen.text == ""
    assert gen.model == "fake-model"
    assert gen.usage == Usage()
    assert gen.request == job.request
    assert gen.chunks == job.context.chunks
    assert len(engine.calls) == 1
