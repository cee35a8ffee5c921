"""Inference: run the engine on a job and describe the result as a generation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kllm.errors import EngineError
from processors.base import Emit
from schemas import Generation, InferenceJob, Usage
from schemas.messages import ChatTurn
from topics import GENERATIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    text: str
    finish_reason: str
    usage: Usage
    latency_ms: float
    ttft_ms: float | None = None


class Engine(Protocol):
    """A generation engine; raises :class:`EngineError` when it fails."""

    model: str

    def generate(self, messages: Sequence[ChatTurn], max_tokens: int) -> EngineResult: ...


class Generator:
    def __init__(self, engine: Engine, default_max_tokens: int = 64) -> None:
        self.engine = engine
        self.default_max_tokens = default_max_tokens

    def process(self, job: InferenceJob) -> list[Emit]:
        request = job.request
        max_tokens = request.max_tokens or self.default_max_tokens
        try:
            result = self.engine.generate(job.messages, max_tokens)
        except EngineError as exc:
            # The caller still gets an answer: an error generation, not silence.
            log.warning(
                "engine failed", extra={"request_id": request.request_id, "error": str(exc)}
            )
            generation = Generation(
                request=request,
                chunks=job.context.chunks,
                text="",
                model=self.engine.model,
                finish_reason="error",
                error=f"engine error: {exc}",
            )
            return [Emit(GENERATIONS, request.request_id, generation)]
        generation = Generation(
            request=request,
            chunks=job.context.chunks,
            text=result.text,
            model=self.engine.model,
            finish_reason=result.finish_reason,
            usage=result.usage,
            latency_ms=result.latency_ms,
            ttft_ms=result.ttft_ms,
        )
        return [Emit(GENERATIONS, request.request_id, generation)]
