"""A consumer loop that processes records in micro-batches.

Records that arrive together (up to ``max_batch``, waiting at most
``max_wait_s`` for the first) are handled in one call, so a model that is
fastest in batches (an embedding model) sees batches. Offsets are committed
after the batch's outputs are acknowledged: a SIGKILL replays at most the
batch in flight.

A handler may give records back (:class:`Handled`): a time budget ran out, or a
dependency is down. Its partition is then committed only up to the first record
given back and rewound to it (seek), so those records are read again, and nothing
past them is committed. After an outage the runner waits (``retry_in_s``, without
reading that runner's records) before it reads them again.

:func:`isolated` makes a handler from a processor that answers each record on its
own (processors.batching): one record's failure dead-letters that record (and
answers its caller), never the batch; a record that fails because a dependency is
down is read again, with backoff, until ``retry_budget_s`` has passed since its
first failure, and only then dead-lettered with an ``unavailable`` answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from confluent_kafka import KafkaException, TopicPartition
from opentelemetry.trace import Span

from kllm.core.errors import BrokerError, PipelineError
from kllm.runtime import tracing
from kllm.runtime.delivery import commit, next_offsets, publish_acked
from kllm.runtime.dispatch import (
    RecordRef,
    dead_letter,
    decode_batch,
    oversized,
    ref_of,
    unanswered,
)
from kllm.runtime.kafka import records_only
from kllm.runtime.metrics import StageMetrics
from kllm.runtime.ports import Consumer, Producer
from kllm.runtime.stop import StopFlag
from processors.base import Emit, Rejected
from processors.batching import Failed, Result, isolate
from schemas import Message
from topics import TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

RETRY_AFTER_S = 5.0
"""What a caller whose request was dead-lettered in an outage is told to wait."""
MAX_BACKOFF_S = 2.0
"""The longest wait before reading given-back records again (well under
max.poll.interval.ms: the runner does not poll while it waits)."""


@dataclass(frozen=True)
class Handled:
    """A handler's outputs, and the records it gives back: partition -> the first offset
    to read again (that record and every later one of its partition are not handled).
    ``retry_in_s``: wait that long before reading them (a dependency is down)."""

    outputs: list[Emit]
    again: Mapping[int, int] = field(default_factory=dict)
    retry_in_s: float = 0.0


BatchHandler = Callable[[Sequence[tuple[RecordRef, bytes]]], "list[Emit] | Handled"]
ProcessEach = Callable[[list[M]], list[Result]]
"""Messages -> one result each, in order; fewer when the rest are to be read again."""


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


def isolated(
    stage: str,
    schema: type[M],
    process_each: ProcessEach[M],
    check: Callable[[M], None] | None = None,
    *,
    retry_budget_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> BatchHandler:
    """A batch handler from a processor of per-record results (see the module's doc):
    records that do not decode or that ``check`` refuses are dead-lettered; a processor
    call that raises is split (processors.batching.isolate) down to the records that
    fail; a record whose outputs are over the record limit is dead-lettered."""
    first_failed: dict[tuple[int, int], float] = {}
    outages = [0]  # handler calls in a row that gave records back for an outage

    def call(part: Sequence[M]) -> list[Result]:
        try:
            return process_each(list(part))
        except PipelineError:
            raise
        except Exception as exc:  # a bug or an untranslated library error: split, isolate
            log.exception("batch processing raised", extra={"stage": stage, "records": len(part)})
            raise PipelineError(f"InternalError: {type(exc).__name__}") from exc

    def settle(ref: RecordRef, value: bytes, result: Result, now: float) -> list[Emit] | None:
        """The record's outputs, or None to read it again."""
        key = (ref.partition, ref.offset)
        if isinstance(result, Failed):
            reason = f"{type(result.error).__name__}: {result.error}"
            if result.retry:
                since = first_failed.setdefault(key, now)
                if now - since < retry_budget_s:
                    return None
                reason += f" (still failing after {retry_budget_s:g} s)"
                refusal = Rejected(reason, code="unavailable", retry_after_s=RETRY_AFTER_S)
            elif isinstance(result.error, Rejected):
                refusal = result.error
            else:
                refusal = Rejected(reason, code=result.code)
            first_failed.pop(key, None)
            return dead_letter(stage, ref, value, reason, refusal)
        first_failed.pop(key, None)
        if (too_big := oversized(result)) is not None:
            return dead_letter(stage, ref, value, too_big)
        return result

    def handle(records: Sequence[tuple[RecordRef, bytes]]) -> Handled:
        now = clock()
        per: list[list[Emit] | None] = [None] * len(records)
        messages: list[M] = []
        at: list[int] = []
        for i, record in enumerate(records):
            good, rejected = decode_batch(stage, [record], schema, check)
            if good:
                messages.append(good[0])
                at.append(i)
            else:
                per[i] = rejected
        results = _split(messages, call)
        for i, result in zip(at, results, strict=False):  # shorter: the rest come again
            per[i] = settle(*records[i], result, now)
        down = [r for r in results if isinstance(r, Failed) and r.retry]
        if down:
            # Not tried, the dependency being down: waiting on it too, since now.
            for i in at[len(results) :]:
                per[i] = settle(*records[i], down[-1], now)
        outputs: list[Emit] = []
        again: dict[int, int] = {}
        for (ref, _value), out in zip(records, per, strict=True):
            if ref.partition in again:
                continue  # after a record read again: read again too, in order
            if out is None:
                again[ref.partition] = ref.offset
            else:
                outputs.extend(out)
        for key, since in list(first_failed.items()):
            if now - since > 4 * retry_budget_s:
                del first_failed[key]  # its partition went elsewhere, or it was replayed
        outage = bool(down) and bool(again)
        outages[0] = outages[0] + 1 if outage else 0
        retry_in = min(MAX_BACKOFF_S, 0.1 * 2 ** (outages[0] - 1)) if outage else 0.0
        return Handled(outputs, again, retry_in)

    return handle


def _split(messages: list[M], call: Callable[[Sequence[M]], list[Result]]) -> list[Result]:
    if not messages:
        return []
    return isolate(messages, call)


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
        self._resume_at = 0.0
        consumer.subscribe([source.name])

    def step(self, wait_s: float | None = None) -> int:
        """Consume and handle one batch; returns how many records it handled."""
        wait = self.max_wait_s if wait_s is None else wait_s
        pause = self._resume_at - time.monotonic()
        if pause > 0:
            # Backing off after an outage: the records given back wait; so does the loop.
            time.sleep(min(wait, pause))
            return 0
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
            handled = self.handler(records)
            if not isinstance(handled, Handled):
                handled = Handled(handled)
            by_key = {ref.key: ref for ref, _ in records}  # outputs are keyed like inputs
            outputs = unanswered(handled.outputs, lambda rid: str(by_key.get(rid, records[0][0])))
            handled = replace(handled, outputs=outputs)
            # Not committed if this raises: the batch is replayed after the restart.
            publish_acked(self.producer, handled.outputs, carried)
        finally:
            for span in spans:
                span.end()
        again = handled.again
        done = [
            (self.source.name, r.partition, r.offset)
            for r, _ in records
            if r.partition not in again or r.offset < again[r.partition]
        ]
        commit(self.consumer, next_offsets(done), asynchronous=True)
        for partition, offset in again.items():
            self._rewind(partition, offset)
        if handled.retry_in_s > 0:
            self._resume_at = time.monotonic() + handled.retry_in_s
        if self.metrics is not None:
            self.metrics.observe(
                self.source.name, len(done), handled.outputs, time.perf_counter() - t0
            )
        log.info(
            "batch processed",
            extra={
                "records": len(records),
                "given_back": len(records) - len(done),
                "first": str(records[0][0]),
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )
        return len(done)

    def _rewind(self, partition: int, offset: int) -> None:
        """Read ``partition`` again from ``offset``. Raises BrokerError: carrying on
        would commit past the records given back."""
        try:
            self.consumer.seek(TopicPartition(self.source.name, partition, offset))
        except KafkaException as exc:
            where = f"{self.source.name}[{partition}]@{offset}"
            raise BrokerError(f"cannot rewind {where}: {exc}") from exc

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
