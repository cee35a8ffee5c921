"""Drift stage: river detectors over the request, retrieval, response and feedback
streams; alerts to llm.drift.alerts.

One process (every detector sees all of a tenant's events, and the input topics
are keyed by request id). Detector state is checkpointed to a file every few
seconds, and offsets are committed only after the checkpoint: a restart resumes
the detectors and replays just the events after the checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from pydantic import Field

from kllm.core.errors import BrokerError, ConfigError, PipelineError
from kllm.runtime import logs, metrics
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import StageSettings, group_id
from processors.drift import DriftMonitor, PromptReference
from processors.drift_signals import DriftStage, Embed, EmbedBudget
from schemas import Message, decode, encode
from topics import FEEDBACK_ENRICHED, INFERENCE, RESPONSES, RETRIEVAL

STAGE = "drift"
SOURCES = (RETRIEVAL, INFERENCE, RESPONSES, FEEDBACK_ENRICHED)
CHECKPOINT_VERSION = 1
log = logging.getLogger(__name__)


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


@dataclass
class Checkpoint:
    path: Path

    def load(self) -> tuple[DriftMonitor, PromptReference] | None:
        if not self.path.exists():
            return None
        try:
            saved = pickle.loads(self.path.read_bytes())  # our own file, in the run folder
            version = saved.get("version") if isinstance(saved, dict) else None
            monitor, reference = (saved["monitor"], saved["reference"]) if version else (0, 0)
        except Exception as exc:
            raise ConfigError(f"cannot read the drift checkpoint {self.path}: {exc!r}") from exc
        if (
            version != CHECKPOINT_VERSION
            or not isinstance(monitor, DriftMonitor)
            or not isinstance(reference, PromptReference)
        ):
            raise ConfigError(
                f"{self.path} is from another version, or not a checkpoint; move it away"
            )
        return monitor, reference

    def save(self, stage: DriftStage) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "version": CHECKPOINT_VERSION,
            "monitor": stage.monitor,
            "reference": stage.reference,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(body))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new checkpoint


def build(settings: Settings, *, embed: Embed | None = None) -> tuple[DriftStage, Checkpoint]:
    if embed is None:
        from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder

        embed = SentenceTransformerEmbedder(
            settings.embed_model or None, threads=settings.torch_threads
        ).embed
    checkpoint = Checkpoint(settings.checkpoint_path())
    saved = checkpoint.load()
    if saved is None:
        monitor = DriftMonitor(warmup=settings.drift_warmup, cooldown=settings.drift_cooldown)
        reference = PromptReference(settings.drift_reference_size)
    else:
        monitor, reference = saved
        log.info("resumed from checkpoint", extra={"streams": len(monitor.streams())})
    budget = EmbedBudget(settings.drift_embed_per_s) if settings.drift_embed_per_s else None
    return DriftStage(monitor, reference, embed, budget), checkpoint


class _Stop:
    requested = False

    def __call__(self, _sig: int, _frame: FrameType | None) -> None:
        self.requested = True


def _decode(msg: Any) -> Message | None:
    schema = {t.name: t.schema for t in SOURCES}[msg.topic()]
    try:
        return decode(msg.value() or b"", schema)  # type: ignore[arg-type]
    except PipelineError as exc:  # a side reader: the topic's own consumers report it
        log.warning("unreadable record skipped", extra={"topic": msg.topic(), "reason": str(exc)})
        return None


def _persist(
    stage: DriftStage, checkpoint: Checkpoint, consumer: Consumer, producer: Producer
) -> None:
    """Alerts out, state saved, then offsets: never an offset past unsaved state."""
    producer.flush(10)
    checkpoint.save(stage)
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if "NO_OFFSET" not in str(exc):
            raise BrokerError(f"commit failed: {exc}") from exc


def serve(settings: Settings, stage: DriftStage, checkpoint: Checkpoint) -> None:
    stage_metrics = metrics.for_stage(STAGE)
    stage_metrics.serve(settings.metrics_port)
    bootstrap = settings.bootstrap()
    producer = make_producer(bootstrap, settings.producer_config())
    consumer = make_consumer(bootstrap, group_id(STAGE), settings.consumer_config())
    consumer.subscribe(
        [t.name for t in SOURCES],
        on_revoke=lambda c, _parts: _persist(stage, checkpoint, c, producer),
    )
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mark_ready(settings.ready_file)
    log.info("stage running", extra={"stage": STAGE})
    last = time.monotonic()
    try:
        while not stop.requested:
            batch = consumer.consume(num_messages=256, timeout=0.2)
            t0 = time.perf_counter()
            messages = [m for msg in batch if msg.error() is None and (m := _decode(msg))]
            alerts = stage.process_batch(messages, time.time())
            stage_metrics.observe("inputs", len(batch), alerts, time.perf_counter() - t0)
            for emit in alerts:
                producer.produce(emit.topic.name, key=emit.key, value=encode(emit.message))
                log.warning("drift alert", extra={"alert": emit.key, "signal": emit.message.signal})  # type: ignore[attr-defined]
            producer.poll(0)
            if time.monotonic() - last >= settings.drift_checkpoint_every_s:
                _persist(stage, checkpoint, consumer, producer)
                last = time.monotonic()
    finally:
        _persist(stage, checkpoint, consumer, producer)
        consumer.close()


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    stage, checkpoint = build(settings)
    serve(settings, stage, checkpoint)


if __name__ == "__main__":
    main()
