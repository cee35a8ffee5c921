"""Drift stage: river detectors over the request, retrieval, response and feedback
streams; alerts to llm.drift.alerts.

One process (every detector sees all of a tenant's events, and the input topics
are keyed by request id). Detector state is checkpointed to a file every few
seconds, and offsets are committed only after the checkpoint
(kllm.runtime.checkpointed): a restart resumes the detectors and replays just the
events after the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from kllm.runtime import logs, metrics
from kllm.runtime.checkpointed import CheckpointedRunner, FileCheckpoint
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import StageSettings
from kllm.runtime.stop import Stop
from processors import drift_state
from processors.drift import DriftMonitor, PromptReference
from processors.drift_signals import DriftStage, Embed, EmbedBudget
from topics import DRIFT_GROUP

STAGE = "drift"
log = logging.getLogger(__name__)

Checkpoint = FileCheckpoint[drift_state.State]


class Settings(StageSettings):
    drift_checkpoint: Path | None = None
    """Detector state file; default: drift/state.pkl in the run folder."""
    drift_checkpoint_every_s: float = Field(default=5.0, gt=0)
    drift_warmup: int = Field(default=500, ge=2)
    """Values of a stream that build its reference (again after an alert) before it can alert."""
    drift_cooldown: int = Field(default=1000, ge=0)
    """Events after an alert before the same stream can alert again."""
    drift_reference_size: int = Field(default=200, ge=10)
    """Prompts that make a tenant's reference embedding."""
    drift_embed_per_s: float = Field(default=20.0, ge=0)
    """Prompts embedded per second at most; beyond that the prompt-distance signal is a
    sample. 0: every prompt."""
    embed_model: str = ""

    def checkpoint_path(self) -> Path:
        return self.drift_checkpoint or self.run_dir / "drift" / "state.pkl"


def build(settings: Settings, *, embed: Embed | None = None) -> tuple[DriftStage, Checkpoint]:
    if embed is None:
        from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder

        embed = SentenceTransformerEmbedder(
            settings.embed_model or None, threads=settings.torch_threads
        ).embed
    checkpoint = Checkpoint(settings.checkpoint_path(), drift_state.dumps, drift_state.loads)
    saved = checkpoint.load()
    if saved is None:
        monitor = DriftMonitor(warmup=settings.drift_warmup, cooldown=settings.drift_cooldown)
        reference = PromptReference(settings.drift_reference_size)
    else:
        monitor, reference = saved
        log.info("resumed from checkpoint", extra={"streams": len(monitor.streams())})
    budget = EmbedBudget(settings.drift_embed_per_s) if settings.drift_embed_per_s else None
    return DriftStage(monitor, reference, embed, budget), checkpoint


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    stage, checkpoint = build(settings)
    stage_metrics = metrics.for_stage(STAGE)
    stage_metrics.serve(settings.metrics_port)
    bootstrap = settings.bootstrap()
    runner = CheckpointedRunner(
        make_consumer(bootstrap, DRIFT_GROUP.name, settings.consumer_config()),
        make_producer(bootstrap, settings.producer_config()),
        DRIFT_GROUP.inputs,
        stage.process_batch,
        lambda: checkpoint.save((stage.monitor, stage.reference)),
        stage=STAGE,
        every_s=settings.drift_checkpoint_every_s,
        metrics=stage_metrics,
    )
    log.info("stage running", extra={"stage": STAGE})
    runner.run(Stop().install(), on_ready=lambda: mark_ready(settings.ready_file))


if __name__ == "__main__":
    main()
