"""Evaluation stage: a sample of the answers (llm.generations) and every shadow answer
(llm.generations.shadow) scored online into llm.evaluations, for the drift stage's
quality detectors, the metrics, the dashboard and `kllm shadow report`.

A side reader in its own group (kllm-evaluation): moderation owns llm.generations and
dead-letters what it cannot read; this stage skips it. See processors/online_eval.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kllm.runtime import logs, tracing
from kllm.runtime.dispatch import StageLogic
from kllm.runtime.quix import serve_many
from kllm.runtime.settings import StageSettings
from processors.online_eval import UNSUPPORTED_BELOW, OnlineEvaluator
from processors.retrieval import Embedder
from schemas import Generation
from topics import GENERATIONS, GENERATIONS_SHADOW, TopicSpec

STAGE = "evaluation"


class Settings(StageSettings):
    eval_sample: float = Field(default=0.1, ge=0.0, le=1.0)
    """The share of each tenant's answers scored (fixed by request id)."""
    eval_sample_per_tenant: dict[str, float] = Field(default_factory=dict)
    """Tenant -> its own share, e.g. {"acme": 1.0}."""
    eval_min_groundedness: float = Field(default=UNSUPPORTED_BELOW, ge=0.0, le=1.0)
    """Groundedness under which an answer counts as unsupported."""
    embed_model: str = ""


def build(
    settings: Settings, *, embedder: Embedder | None = None
) -> list[tuple[TopicSpec, StageLogic[Any]]]:
    if embedder is None:
        from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(
            settings.embed_model or None, threads=settings.torch_threads
        )
    evaluator = OnlineEvaluator(
        embedder,
        sample=settings.eval_sample,
        per_tenant=settings.eval_sample_per_tenant,
        min_groundedness=settings.eval_min_groundedness,
    )
    shadow = OnlineEvaluator(
        embedder, evaluator.scorer, sample=1.0, min_groundedness=evaluator.min_groundedness,
        source="shadow",
    )  # fmt: skip
    return [
        (GENERATIONS, StageLogic(STAGE, Generation, evaluator.process, owner=False)),
        # Every shadow answer: the shadow sampled its jobs already, by the same draw.
        (GENERATIONS_SHADOW, StageLogic(STAGE, Generation, shadow.process, owner=False)),
    ]


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    serve_many(settings, STAGE, build(settings))


if __name__ == "__main__":
    main()
