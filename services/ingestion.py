"""Ingestion stage: llm.requests -> llm.retrieval (bad input -> llm.requests.dlq)."""

from __future__ import annotations

from kllm import logs
from kllm.settings import StageSettings
from processors.dispatch import StageLogic
from processors.ingestion import Ingestion, IngestionPolicy
from schemas import Request
from services.runtime import serve
from topics import REQUESTS

STAGE = "ingestion"


class Settings(StageSettings):
    max_prompt_chars: int = 8000
    max_tokens_cap: int = 1024
    default_max_tokens: int = 64


def build(settings: Settings) -> StageLogic[Request]:
    policy = IngestionPolicy(
        max_prompt_chars=settings.max_prompt_chars,
        max_tokens_cap=settings.max_tokens_cap,
        default_max_tokens=settings.default_max_tokens,
    )
    return StageLogic(STAGE, Request, Ingestion(policy).process)


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    serve(settings, REQUESTS, build(settings))


if __name__ == "__main__":
    main()
