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

from confluent_kafka import Consumer, Producer, TopicPartition
from opentelemetry.trace import Span

from kllm.core.errors import BrokerError
from kllm.runtime import tracing
from kllm.runtime.dispatch import RecordRef
from kllm.runtime.kafka import records_only
from kllm.runtime.metrics import StageMetrics
from processors.base import Emit
from schemas import encode
from topics import TopicSpec

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence[tuple[RecordRef, bytes]]], list[Emit]]


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
            key = msg.key()
            ref = RecordRef(
                self.source, msg.partition(), msg.offset(), key.decode() if key else None
            )
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
            self._publish(outputs, carried)
        finally:
            for span in spans:
                span.end()
        self._commit(records)
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

    def _publish(self, outputs: list[Emit], carried: dict[str | None, tracing.Headers]) -> None:
        errors: list[str] = []

        def on_delivery(err: object, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        for emit in outputs:
            self.producer.produce(
                emit.topic.name,
                key=emit.key,
                value=encode(emit.message),
                headers=carried.get(emit.key),
                on_delivery=on_delivery,
            )
        if self.producer.flush(30) > 0 or errors:
            # Not committed: the batch is replayed after the restart this causes.
            raise BrokerError(f"publishing a batch failed: {errors[:3] or 'flush timed out'}")

    def _commit(self, records: list[tuple[RecordRef, bytes]]) -> None:
        last: dict[int, int] = {}
        for ref, _ in records:
            last[ref.partition] = max(last.get(ref.partition, -1), ref.offset)
        offsets = [TopicPartition(self.source.name, p, o + 1) for p, o in last.items()]
        self.consumer.commit(offsets=offsets, asynchronous=True)

    def close(self) -> None:
        self.consumer.close()
