"""Runs a stage as a quixstreams application with at-least-once delivery.

quixstreams flushes the producer before it commits the consumed offsets, so
an offset is committed only after the stage's output is acknowledged: a
SIGKILL replays uncommitted records (duplicates are possible, loss is not).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from quixstreams import Application, State, message_context
from quixstreams.checkpointing.exceptions import CheckpointConsumerCommitError
from quixstreams.dataframe import StreamingDataFrame
from quixstreams.models.serializers import Serializer

from kllm.core.errors import ConfigError
from kllm.core.refs import readable_key
from kllm.runtime import ledger, metrics, tracing
from kllm.runtime.dispatch import RecordRef, StageLogic, dispatch
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import StageSettings
from processors.base import Emit
from schemas import Message, encode
from topics import ALL, TopicSpec, primary_group

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class _EmitSerializer(Serializer):
    def __call__(self, value: Emit, ctx: Any) -> bytes:
        return encode(value.message)


def build_app(
    settings: StageSettings, stage: str, sources: Sequence[TopicSpec] = ()
) -> Application:
    """The stage's application in its declared consumer group (topics.groups), which must
    read every one of ``sources``."""
    group = primary_group(stage)
    undeclared = [t.name for t in sources if t not in group.inputs]
    if undeclared:
        raise ConfigError(f"{group.name} is not declared to read {', '.join(undeclared)}")
    return Application(
        broker_address=settings.bootstrap(),
        consumer_group=group.name,
        auto_offset_reset="earliest",
        auto_create_topics=False,  # `kllm provision` made them; quixstreams would stall creating
        commit_interval=settings.commit_interval_s,
        consumer_extra_config=settings.consumer_config(),
        producer_extra_config=settings.quix_producer_config(),
        state_dir=str(settings.state_dir or settings.run_dir / "state" / stage),
        use_changelog_topics=True,
        processing_guarantee="at-least-once",
        loglevel=settings.quix_log_level,
    )


def _sinks(app: Application) -> dict[str, Any]:
    """Every declared topic as an output of ``app``, by name."""
    return {
        spec.name: app.topic(spec.name, key_serializer="str", value_serializer=_EmitSerializer())
        for spec in ALL
    }


def serve(settings: StageSettings, source: TopicSpec, logic: StageLogic[M]) -> None:
    """Consume ``source``, dispatch each record, produce every output; runs until SIGTERM."""
    serve_many(settings, logic.name, [(source, logic)])


def serve_many(
    settings: StageSettings, stage: str, flows: Sequence[tuple[TopicSpec, StageLogic[Any]]]
) -> None:
    """One consumer group reading several topics, each with its own logic."""
    metrics.for_stage(stage).serve(settings.metrics_port)
    _install_ledger(settings, flows)

    def assemble() -> Application:
        app = build_app(settings, stage, [source for source, _ in flows])
        sink = _sinks(app)
        for source, logic in flows:
            sdf = app.dataframe(
                app.topic(source.name, key_deserializer="bytes", value_deserializer="bytes")
            )
            _to_sinks(_apply(sdf, source, logic), sink)
        return app

    _run_rejoining(settings, stage, [source.name for source, _ in flows], assemble)


def _run_rejoining(
    settings: StageSettings, stage: str, sources: list[str], assemble: Callable[[], Application]
) -> None:
    """Run the application until SIGTERM. A commit the group refuses (the broker paused
    past the session timeout: this process is no longer a member) ends quixstreams'
    run; the uncommitted records go to the partitions' next owners. The stage then
    joins again with a new application, in this process: its models stay loaded. Its
    outputs were all acknowledged (quixstreams flushes before it commits); an answer
    the broker lost all the same is given again once its note is stale
    (kllm.runtime.ledger.AnswerLedger)."""
    while True:
        app = assemble()
        mark_ready(settings.ready_file)
        log.info("stage running", extra={"stage": stage, "source": sources, "pid": os.getpid()})
        try:
            app.run()
            return
        except CheckpointConsumerCommitError as exc:
            log.warning("left the group (commit refused); joining again", extra={"error": str(exc)})
            time.sleep(1.0)


def _install_ledger(
    settings: StageSettings, flows: Sequence[tuple[TopicSpec, StageLogic[Any]]]
) -> None:
    """Dead-letter once per source offset, for the topics this stage owns, and answer once
    per request, across replays."""
    owned = [source for source, logic in flows if logic.owner]
    fetch_wait = int(settings.consumer_config()["fetch.wait.max.ms"])
    ledger.install_for(settings.bootstrap(), owned, fetch_wait)


def _to_sinks(sdf: StreamingDataFrame, sink: dict[str, Any]) -> None:
    """Produce each Emit to its topic with its trace headers. The record's timestamp is
    the time it was produced (Kafka's CreateTime), not the input's that quixstreams would
    copy: the pipeline does no event-time windowing, and the dashboard times stages by it."""
    sdf = sdf.set_headers(lambda e, _k, _ts, _h: list(e.headers))
    sdf = sdf.set_timestamp(lambda _e, _k, _ts, _h: int(time.time() * 1000))
    sdf.to_topic(lambda value, _k, _ts, _h: sink[value.topic.name], key=lambda e: e.key)


def _measured(
    logic: StageLogic[Any],
    ref: RecordRef,
    value: bytes | None,
    headers: Any,
    state: State[Any, Any] | None = None,
) -> list[Emit]:
    t0 = time.perf_counter()
    where = tracing.Where(logic.name, ref.topic.name, ref.partition, ref.offset)
    with tracing.record_span(where, headers) as span:
        out = dispatch(logic, ref, value, state)
        rid = next((r for e in out if (r := getattr(e.message, "request_id", None))), None)
        if rid:
            span.set_attribute("kllm.request_id", rid)
        carried = tuple(tracing.headers_for(span))
    metrics.for_stage(logic.name).observe(ref.topic.name, 1, out, time.perf_counter() - t0)
    return [replace(e, headers=carried) for e in out]


def _apply(sdf: StreamingDataFrame, source: TopicSpec, logic: StageLogic[Any]) -> Any:
    def handle(value: bytes | None, key: bytes | None, _ts: int, headers: Any) -> list[Emit]:
        ctx = message_context()
        ref = RecordRef(source, ctx.partition, ctx.offset, readable_key(key))
        return _measured(logic, ref, value, headers)

    def handle_keyed(
        value: bytes | None, key: bytes | None, _ts: int, headers: Any, state: State[Any, Any]
    ) -> list[Emit]:
        ctx = message_context()
        ref = RecordRef(source, ctx.partition, ctx.offset, readable_key(key))
        return _measured(logic, ref, value, headers, state)

    if logic.process_keyed is not None:
        return sdf.apply(handle_keyed, expand=True, metadata=True, stateful=True)
    return sdf.apply(handle, expand=True, metadata=True)


def serve_join(
    settings: StageSettings, stage: str, flows: Sequence[tuple[TopicSpec, StageLogic[Any]]]
) -> None:
    """Several topics with the same key and partition count, merged into one stream whose
    keyed state all of them share (a join): each record goes to its topic's logic."""
    metrics.for_stage(stage).serve(settings.metrics_port)
    _install_ledger(settings, flows)
    by_topic = {source.name: (source, logic) for source, logic in flows}

    def handle(
        value: bytes | None, key: bytes | None, _ts: int, headers: Any, state: State[Any, Any]
    ) -> list[Emit]:
        ctx = message_context()
        source, logic = by_topic[ctx.topic]
        ref = RecordRef(source, ctx.partition, ctx.offset, readable_key(key))
        return _measured(logic, ref, value, headers, state)

    def assemble() -> Application:
        app = build_app(settings, stage, [source for source, _ in flows])
        sink = _sinks(app)
        frames = [
            app.dataframe(
                app.topic(source.name, key_deserializer="bytes", value_deserializer="bytes")
            )
            for source, _ in flows
        ]
        merged = frames[0]
        for frame in frames[1:]:
            merged = merged.concat(frame)
        _to_sinks(merged.apply(handle, expand=True, metadata=True, stateful=True), sink)
        return app

    _run_rejoining(settings, stage, list(by_topic), assemble)
