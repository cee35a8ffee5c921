"""A consumer loop that processes records in micro-batches.

Records that arrive together (up to ``max_batch``, waiting at most
``max_wait_s`` for the first) are handled in one call, so a model that is
fastest in batches (an embedding model) sees batches. Offsets are committed
after the batch's outputs are acknowledged: a SIGKILL replays at most the
batch in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from opentelemetry.trace import Span

from kllm.runtime import tracing
from kllm.runtime.delivery import commit, next_offsets, publish_acked
from kllm.runtime.dispatch import RecordRef, decode_batch, ref_of
from kllm.runtime.kafka import records_only
from kllm.runtime.metrics import StageMetrics
from kllm.runtime.ports import Consumer, Producer
from kllm.runtime.stop import StopFlag
from processors.base import Emit
from schemas import Message
from topics import TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

BatchHandler = Callable[[Sequence[tuple[RecordRef, bytes]]], list[Emit]]


def decoded(
    stage: str,
    schema: type[M],
    process: Callable[[list[M]], list[Emit]],
    check: Callable[[M], None] | None = None,
    *,
    owner: bool = True,
) -> BatchHandler:
    """A batch handler from a processor of messages: the records that do not decode, or
    that ``check`` refuses, are dead-lettered (kllm.runtime.dispatch.decode_batch); the
    rest go to ``process`` in one call. ``owner=False``: a side reader, which never
    dead-letters another stage's records."""

    def handle(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
        good, rejected = decode_batch(stage, records, schema, check, owner=owner)
        return rejected + process(good)

    return handle


class BatchRunner:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        source: TopicSpec,
        handler: BatchHandler,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        metrics: StageMetrics | None = None,
        stage: str = "batch",
    ) -> None:
        self.metrics = metrics
        self.stage = stage
        self.consumer = consumer
        self.producer = producer
        self.source = source
        self.handler = handler
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        consumer.subscribe([source.name])

    def step(self, wait_s: float | None = None) -> int:
        """Consume and handle one batch; returns how many records it held."""
        wait = self.max_wait_s if wait_s is None else wait_s
        msgs = self.consumer.consume(num_messages=self.max_batch, timeout=wait)
        records = []
        spans: list[Span] = []
        carried: dict[str | None, tracing.Headers] = {}
        for msg in records_only(msgs):
            ref = ref_of(self.source, msg)
            records.append((ref, msg.value() or b""))
            where = tracing.Where(self.stage, self.source.name, ref.partition, ref.offset)
            spans.append(tracing.start_record_span(where, msg.headers(), ref.key or ""))
            # An output is keyed like its input (request id, document id): it continues
            # the trace of the record with its key.
            carried[ref.key] = tracing.headers_for(spans[-1])
        if not records:
            return 0
        t0 = time.perf_counter()
        try:
            outputs = self.handler(records)
            # Not committed if this raises: the batch is replayed after the restart.
            publish_acked(self.producer, outputs, carried)
        finally:
            for span in spans:
                span.end()
        offsets = next_offsets((self.source.name, r.partition, r.offset) for r, _ in records)
        commit(self.consumer, offsets, asynchronous=True)
        if self.metrics is not None:
            self.metrics.observe(self.source.name, len(records), outputs, time.perf_counter() - t0)
        log.info(
            "batch processed",
            extra={
                "records": len(records),
                "first": str(records[0][0]),
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )
        return len(records)

    def close(self) -> None:
        # No final commit of remembered offsets: after a rebalance they may belong to
        # partitions another member has since moved past (it would rewind them).
        self.consumer.close()


def run_batches(runners: Sequence[BatchRunner], stop: StopFlag) -> None:
    """Step each runner in turn until ``stop``, then close them all. The last waits for
    records up to its own ``max_wait_s``; those before it do not wait, and come first
    (a fresh document is searchable before the next query)."""
    *first, last = runners
    try:
        while not stop.is_set():
            for runner in first:
                runner.step(wait_s=0)
            last.step()
    finally:
        for runner in runners:
            runner.close()
