"""A consumer that keeps up to N records in flight, for stages whose work is slow.

Why not the per-message runtime: a stage that waits for a model inside the poll
loop leaves a continuous-batching engine idle and, when a call is slow, misses
the group's poll deadline and triggers a rebalance. Here the poll loop never
waits for work: each record becomes an asyncio task, at most N run at once, and
the loop keeps polling (so heartbeats and rebalances are served) all the while.
Records wait in local buffers, one per partition, so a freed slot is refilled at
once. Each partition may hold its share of ``prefetch`` (at least 4); a partition
holding its share is paused, and resumed when it drains (bounded memory, no
refetch stall per completion), and records fetched beyond the share are read
again later. Slots go to the oldest waiting record across partitions (by its
timestamp). Both matter under sustained load: fetched records arrive partition by
partition, and without them the first partitions' records took the slots while
the last partition's waited tens of seconds (seen in traces at 3x capacity).

Offsets: a record's offset is committed only once its outputs are acknowledged
by the broker and every earlier record of its partition is done too
(:class:`kllm.runtime.offsets.OffsetTracker`). A SIGKILL replays what was not
committed; nothing is lost, duplicates are possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from confluent_kafka import TopicPartition

from kllm.core.errors import BrokerError, PipelineError
from kllm.runtime import tracing
from kllm.runtime.delivery import commit, produce, produce_acked_async
from kllm.runtime.dispatch import (
    RecordRef,
    dead_letter,
    dead_letter_record,
    decode_value,
    internal_failure,
    oversized,
    ref_of,
    unanswered,
)
from kllm.runtime.kafka import records_only
from kllm.runtime.metrics import StageMetrics
from kllm.runtime.offsets import OffsetTracker
from kllm.runtime.ports import Consumer, Producer, Record
from kllm.runtime.stop import StopFlag
from processors.base import Emit, Outcome
from schemas import Message
from topics import TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

Handler = Callable[[RecordRef, bytes | None, Callable[[Emit], None]], Awaitable[list[Emit]]]
"""(record, value, publish-now) -> outputs to publish before the offset may commit."""
Publish = Callable[[Emit], None]


def decoded(
    stage: str, schema: type[M], run: Callable[[M, Publish], Awaitable[Outcome]]
) -> Handler:
    """A handler from a processor of messages: a record that does not decode, or whose
    processing raises a PipelineError, is dead-lettered; an outcome with a ``failure``
    is dead-lettered beside its outputs (the caller's error answer among them)."""

    async def handle(ref: RecordRef, value: bytes | None, publish: Publish) -> list[Emit]:
        try:
            outcome = await run(decode_value(value, schema), publish)
        except PipelineError as exc:  # unreadable, or e.g. a model nobody here serves
            return dead_letter(stage, ref, value, f"{type(exc).__name__}: {exc}", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not crash-loop the stage on one record
            reason = internal_failure(stage, ref, value, exc)
            return dead_letter(stage, ref, value, reason, code="unavailable")
        if (too_big := oversized(outcome.emits)) is not None:
            return dead_letter(stage, ref, value, too_big)
        if outcome.failure is None:
            return outcome.emits
        return [*outcome.emits, *dead_letter_record(stage, ref, value, outcome.failure)]

    return handle


class InflightRunner:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        source: TopicSpec,
        handler: Handler,
        capacity: int,
        prefetch: int | None = None,
        commit_interval_s: float = 0.2,
        drain_timeout_s: float = 30.0,
        metrics: StageMetrics | None = None,
        stage: str = "inference",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.consumer = consumer
        self.producer = producer
        self.source = source
        self.handler = handler
        self.capacity = capacity
        self.prefetch = 2 * capacity if prefetch is None else prefetch
        self.buffers: dict[int, deque[Record]] = {}
        self.assigned: set[int] = set()
        self.paused: set[int] = set()
        self.commit_interval_s = commit_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics
        self.stage = stage
        self.offsets = OffsetTracker()
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.max_in_flight = 0
        self._failure: BaseException | None = None
        self._last_commit = 0.0

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: StopFlag, on_ready: Callable[[], None] | None = None) -> None:
        self.consumer.subscribe(
            [self.source.name], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        if on_ready:
            on_ready()
        try:
            while not stop.is_set() and self._failure is None:
                busy = self._poll_once()
                self.producer.poll(0)
                self._commit(force=False)
                # Yield to the tasks; sleep a little only when there was nothing to read.
                await asyncio.sleep(0 if busy else 0.005)
            if self._failure is not None:
                raise self._failure
            await self._drain()
        finally:
            self._commit(force=True)
            self.consumer.close()
            self.producer.flush(10)

    def _poll_once(self) -> bool:
        share = self._pace()
        # Polled even when every partition is paused: it serves heartbeats and rebalances.
        msgs = self.consumer.consume(num_messages=max(self.prefetch, 64), timeout=0)
        got, given_back = False, set()
        for msg in records_only(msgs):
            partition = msg.partition()
            buffered = self.buffers.setdefault(partition, deque())
            if partition in given_back:
                continue  # comes again after the record that rewound its partition
            if partition in self.paused or len(buffered) >= share:
                # Fetched records arrive partition by partition: without a cap the first
                # partition's filled the buffer and the last partition's waited.
                self._give_back(msg)
                given_back.add(partition)
                continue
            # Tracked from now on: the commit cannot pass a record still waiting here.
            self.offsets.start((self.source.name, partition), msg.offset())
            buffered.append(msg)
            got = True
        return self._start_oldest() or got

    def _start_oldest(self) -> bool:
        """Fill free slots with the oldest buffered records (FIFO within a partition)."""
        started = False
        while len(self.tasks) < self.capacity:
            heads = [(q[0].timestamp()[1], p) for p, q in self.buffers.items() if q]
            if not heads:
                break
            self._start(self.buffers[min(heads)[1]].popleft())
            started = True
        return started

    def _pace(self) -> int:
        """Pause the partitions holding their share of the prefetch, resume the others;
        returns the share."""
        # At least a few each: a partition paused after each record is refetched each time.
        share = max(4, -(-self.prefetch // max(1, len(self.assigned))))  # ceiling
        full = {p for p, q in self.buffers.items() if len(q) >= share} & self.assigned
        if full - self.paused:
            self.consumer.pause([TopicPartition(self.source.name, p) for p in full - self.paused])
        if self.paused - full:
            self.consumer.resume([TopicPartition(self.source.name, p) for p in self.paused - full])
        self.paused = full
        return share

    def _give_back(self, msg: Record) -> None:
        """A record beyond its partition's share, or fetched before its pause took effect:
        rewind the partition to it, to read it again once there is room."""
        self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    # -- one record -----------------------------------------------------------------------

    def _start(self, msg: Record) -> None:
        ref = ref_of(self.source, msg)
        partition, offset = ref.partition, ref.offset
        work = self._work(ref, msg.value(), msg.headers())
        task = asyncio.create_task(work, name=str(ref))
        self.tasks[(partition, offset)] = task
        self.max_in_flight = max(self.max_in_flight, len(self.tasks))
        task.add_done_callback(lambda t: self._done(ref, t))

    async def _work(
        self, ref: RecordRef, value: bytes | None, headers: tracing.Headers | None
    ) -> None:
        t0 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.metrics.stage).set(len(self.tasks))
        where = tracing.Where(self.stage, ref.topic.name, ref.partition, ref.offset)
        # The span is current in this task: what it publishes carries its context.
        with tracing.record_span(where, headers, ref.key or ""):
            outputs = unanswered(await self.handler(ref, value, self._publish), lambda _r: str(ref))
            await asyncio.gather(*(self._publish_acked(e) for e in outputs))
            if self.metrics is not None:
                self.metrics.observe(ref.topic.name, 1, outputs, time.perf_counter() - t0)
            log.info(
                "completed",
                extra={
                    "record": str(ref),
                    "request_id": outputs[0].key if outputs else None,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                    "in_flight": len(self.tasks),
                    "max_in_flight": self.max_in_flight,
                    "capacity": self.capacity,
                },
            )

    def _done(self, ref: RecordRef, task: asyncio.Task[None]) -> None:
        key = (ref.partition, ref.offset)
        if self.tasks.get(key) is not task:
            # Revoked and started again (by a rebalance that gave the partition back)
            # before this callback ran: the newer task owns the offset now.
            return
        del self.tasks[key]
        if task.cancelled():
            return  # its partition was revoked: the new owner processes it again
        exc = task.exception()
        if exc is not None:
            # Not committed, so it is replayed after the restart this failure causes.
            log.error(
                "record failed; stopping",
                extra={"request_id": ref.key, "record": str(ref)},
                exc_info=exc,
            )
            self._failure = exc
            return
        self.offsets.finish((self.source.name, ref.partition), ref.offset)

    def _publish(self, emit: Emit) -> None:
        """Publish without waiting (streamed deltas): losing one to a crash costs nothing."""
        produce(self.producer, emit, tracing.headers_for())

    def _publish_acked(self, emit: Emit) -> asyncio.Future[None]:
        # Acknowledged inside producer.poll(), which the loop calls on this thread.
        return produce_acked_async(self.producer, emit, tracing.headers_for())

    # -- offsets and rebalances -----------------------------------------------------------

    def _commit(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = now
        offsets = self.offsets.to_commit(unchanged=force)
        if not offsets:
            return
        try:
            commit(self.consumer, offsets, asynchronous=not force)
        except BrokerError as exc:
            log.warning("commit failed; will retry", extra={"error": str(exc)})
            return
        self.offsets.committed(offsets)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        self.assigned = {p.partition for p in partitions}
        # Unpaused: _on_revoke resumed what it took away paused; the loop pauses again if full.
        self.paused = set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {p.partition for p in partitions}
        log.info(
            "partitions revoked",
            extra={"partitions": sorted(revoked), "paused": sorted(revoked & self.paused)},
        )
        self._commit(force=True)
        # librdkafka keeps a partition's pause flag across a revoke and a later assign
        # (Java's consumer drops it). An eager rebalance revokes everything, so a survivor
        # gets its own partitions straight back: one revoked while paused stayed paused for
        # good, since self.paused forgets it below (the kill -9 test's lost records).
        if revoked & self.paused:
            self.consumer.resume(
                [TopicPartition(self.source.name, p) for p in revoked & self.paused]
            )
        for (partition, _offset), task in list(self.tasks.items()):
            if partition in revoked:
                task.cancel()
        for partition in revoked:
            self.buffers.pop(partition, None)
        self.assigned -= revoked
        self.paused -= revoked
        self.offsets.forget((self.source.name, p) for p in revoked)

    async def _drain(self) -> None:
        """On shutdown: let running records finish, so their offsets can commit."""
        if not self.tasks:
            return
        log.info("draining", extra={"in_flight": len(self.tasks)})
        deadline = time.monotonic() + self.drain_timeout_s
        while self.tasks and time.monotonic() < deadline:
            self.producer.poll(0)
            self.consumer.poll(0)
            await asyncio.sleep(0.01)
        for task in self.tasks.values():
            task.cancel()
