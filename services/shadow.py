"""Shadow worker: a candidate model on a copy of the live inference jobs, in a consumer
group of its own (kllm-shadow-<name>), answering to llm.generations.shadow only.

Started by `kllm shadow start` (or `python -m services.shadow`); not a stage of
`kllm up`. It reads the model list of the inference stage (``KLLM_MODELS``) and runs
the one named ``KLLM_SHADOW_MODEL``. See processors/shadow.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from kllm.core.errors import ConfigError, PipelineError
from kllm.runtime import logs, metrics
from kllm.runtime.dispatch import RecordRef
from kllm.runtime.inflight import Handler, InflightRunner, Publish
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import PROMPTS_DIR
from kllm.runtime.stop import Stop
from processors.base import Emit
from processors.inference import Engine
from processors.shadow import Shadow
from processors.templates import load_templates
from schemas import InferenceJob, decode
from services.inference import Settings as InferenceSettings
from services.inference import build as build_generator
from services.inference import make_engine
from topics import shadow_group

STAGE = "shadow"
LIVE_ONLY = {"auto.offset.reset": "latest"}
log = logging.getLogger(__name__)


class Settings(InferenceSettings):
    shadow_name: str = "candidate"
    """Names the shadow's consumer group, kllm-shadow-<name>."""
    shadow_model: str = ""
    """The candidate: a model of ``KLLM_MODELS`` (default: the first)."""
    shadow_template: str = ""
    """A candidate template tag (name@vN/variant) whose system prompt replaces the job's."""
    shadow_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """The share of jobs copied, drawn as the evaluation stage draws (by request id)."""
    templates_dir: Path = PROMPTS_DIR


def build(settings: Settings, *, engines: Mapping[str, Engine] | None = None) -> tuple[Shadow, int]:
    """The shadow and its in-flight capacity. Only the candidate's engine is built;
    ``engines`` replaces it (a fake in tests)."""
    model = settings.shadow_model or settings.models[0].name
    spec = next((s for s in settings.models if s.name == model), None)
    if spec is None and engines is None:
        known = ", ".join(s.name for s in settings.models)
        raise ConfigError(f"shadow model {model!r} is not in KLLM_MODELS (have: {known})")
    if engines is None and spec is not None:
        engines = {model: make_engine(spec, settings)}
    alone = settings.model_copy(
        update={"default_model": model, "fallback_model": "", "model_aliases": {}}
    )  # the candidate alone: no fallback answers for it
    generator, capacity = build_generator(alone, engines=engines)
    system = template = None
    if settings.shadow_template:
        template = settings.shadow_template
        try:
            system = load_templates(settings.templates_dir).render(template)
        except PipelineError as exc:
            raise ConfigError(f"shadow template {template!r}: {exc}") from exc
    shadow = Shadow(
        generator.run, model, system=system, template=template, sample=settings.shadow_sample
    )
    return shadow, capacity


async def answer_or_skip(shadow: Shadow, job: InferenceJob, record: str) -> list[Emit] | None:
    """The candidate's answer to ``job``; None when it cannot take the job. Whatever
    fails on one job is logged and skipped: a shadow must never stop on a record (and
    never dead-letters one: the live stages own the topic, its DLQ and its callers)."""
    rid = job.request.request_id
    try:
        return await shadow.answer(job)
    except PipelineError as exc:  # e.g. a field the candidate cannot honour
        log.warning(
            "shadow skipped a job", extra={"request_id": rid, "record": record, "reason": str(exc)}
        )
        return None
    except Exception as exc:
        log.exception(
            "shadow failed on a job",
            extra={"request_id": rid, "record": record, "reason": type(exc).__name__},
        )
        return None


def handler(shadow: Shadow) -> Handler:
    """A record of the job topic to the candidate's answer; see ``answer_or_skip``."""

    async def handle(ref: RecordRef, value: bytes | None, _publish: Publish) -> list[Emit]:
        try:
            job = decode(value or b"", InferenceJob)
        except PipelineError as exc:
            extra = {"record": str(ref), "request_id": ref.key, "reason": str(exc)}
            log.warning("shadow skipped an unreadable job", extra=extra)
            return []
        return await answer_or_skip(shadow, job, str(ref)) or []

    return handle


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    shadow, capacity = build(settings)
    stage_metrics = metrics.for_stage(STAGE)
    stage_metrics.serve(settings.metrics_port)
    bootstrap = settings.bootstrap()
    group = shadow_group(settings.shadow_name, settings.pool)
    runner = InflightRunner(
        # A new shadow copies live traffic from now on (`kllm replay` covers the past);
        # after its first commit a restart continues where it stopped.
        make_consumer(bootstrap, group.name, settings.consumer_config() | LIVE_ONLY),
        make_producer(bootstrap, settings.producer_config()),
        group.inputs[0],
        handler(shadow),
        capacity,
        commit_interval_s=min(settings.commit_interval_s, 0.2),
        metrics=stage_metrics,
    )
    log.info("shadow running", extra={"group": group.name, "model": shadow.model})
    asyncio.run(runner.run(Stop().install(), on_ready=lambda: mark_ready(settings.ready_file)))


if __name__ == "__main__":
    main()
