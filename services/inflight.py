"""A consumer that keeps up to N records in flight, for stages whose work is slow.

Why not the per-message runtime: a stage that waits for a model inside the poll
loop leaves a continuous-batching engine idle and, when a call is slow, misses
the group's poll deadline and triggers a rebalance. Here the poll loop never
waits for work: each record becomes an asyncio task, at most N run at once, and
the loop keeps polling (so heartbeats and rebalances are served) all the while.
Up to ``prefetch`` records wait in a local buffer so a freed slot is refilled at
once; when the buffer is full the partitions are paused, and resumed when it
drains (bounded memory, no refetch stall per completion).

Offsets: a record's offset is committed only once its outputs are acknowledged
by the broker and every earlier record of its partition is done too
(:class:`processors.offsets.OffsetTracker`). A SIGKILL replays what was not
committed; nothing is lost, duplicates are possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from kllm import tracing
from kllm.errors import BrokerError
from kllm.kafka import records_only
from kllm.metrics import StageMetrics
from processors.base import Emit
from processors.dispatch import RecordRef
from processors.offsets import OffsetTracker
from schemas import encode
from topics import TopicSpec

log = logging.getLogger(__name__)

Handler = Callable[[RecordRef, bytes, Callable[[Emit], None]], Awaitable[list[Emit]]]
"""(record, value, publish-now) -> outputs to publish before the offset may commit."""


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
        self.prefetch = capacity if prefetch is None else prefetch
        self.buffer: deque[Message] = deque()
        self.commit_interval_s = commit_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics
        self.stage = stage
        self.offsets = OffsetTracker()
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.max_in_flight = 0
        self.paused = False
        self._failure: BaseException | None = None
        self._last_commit = 0.0

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
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
        room = self.prefetch - len(self.buffer)
        if room <= 0:
            self._pause()
            # Still poll: it serves heartbeats and rebalance callbacks while paused.
            msg = self.consumer.poll(0)
            if msg is not None and msg.error() is None:
                self._give_back(msg)
            msgs = []
        else:
            self._resume()
            msgs = self.consumer.consume(num_messages=room, timeout=0)
        for msg in records_only(msgs):
            # Tracked from now on: the commit cannot pass a record still waiting here.
            self.offsets.start((self.source.name, msg.partition()), msg.offset())
            self.buffer.append(msg)
        started = False
        while self.buffer and len(self.tasks) < self.capacity:
            self._start(self.buffer.popleft())
            started = True
        return bool(msgs) or started

    def _pause(self) -> None:
        if not self.paused:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True

    def _resume(self) -> None:
        if self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def _give_back(self, msg: Message) -> None:
        """A record fetched before the pause took effect: read it again after resume."""
        self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    # -- one record -----------------------------------------------------------------------

    def _start(self, msg: Message) -> None:
        partition, offset = msg.partition(), msg.offset()
        raw_key = msg.key()
        ref = RecordRef(self.source, partition, offset, raw_key.decode() if raw_key else None)
        work = self._work(ref, msg.value() or b"", msg.headers())
        task = asyncio.create_task(work, name=str(ref))
        self.tasks[(partition, offset)] = task
        self.max_in_flight = max(self.max_in_flight, len(self.tasks))
        task.add_done_callback(lambda t: self._done(ref, t))

    async def _work(self, ref: RecordRef, value: bytes, headers: tracing.Headers | None) -> None:
        t0 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.metrics.stage).set(len(self.tasks))
        where = (self.stage, ref.topic.name, ref.partition, ref.offset)
        # The span is current in this task: what it publishes carries its context.
        with tracing.record_span(*where, headers, ref.key):
            outputs = await self.handler(ref, value, self._publish)
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
        self.tasks.pop((ref.partition, ref.offset), None)
        if task.cancelled():
            return  # its partition was revoked: the new owner processes it again
        exc = task.exception()
        if exc is not None:
            # Not committed, so it is replayed after the restart this failure causes.
            log.error("record failed; stopping", extra={"record": str(ref)}, exc_info=exc)
            self._failure = exc
            return
        self.offsets.finish((self.source.name, ref.partition), ref.offset)

    def _publish(self, emit: Emit) -> None:
        """Publish without waiting (streamed deltas): losing one to a crash costs nothing."""
        self.producer.produce(
            emit.topic.name,
            key=emit.key,
            value=encode(emit.message),
            headers=tracing.headers_for(),
        )

    def _publish_acked(self, emit: Emit) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_delivery(err: Any, _msg: Any) -> None:
            # Runs inside producer.poll(), on the loop's thread.
            if fut.done():
                return
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(BrokerError(f"publishing to {emit.topic.name} failed: {err}"))

        self.producer.produce(
            emit.topic.name,
            key=emit.key,
            value=encode(emit.message),
            headers=tracing.headers_for(),
            on_delivery=on_delivery,
        )
        return fut

    # -- offsets and rebalances -----------------------------------------------------------

    def _commit(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = now
        offsets = self.offsets.to_commit(unchanged=force)
        if not offsets:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self.consumer.commit(offsets=tps, asynchronous=not force)
        except Exception as exc:  # noqa: BLE001 - librdkafka raises KafkaException for many causes
            log.warning("commit failed; will retry", extra={"error": str(exc)})
            return
        self.offsets.committed(offsets)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        self.paused = False  # a new assignment starts unpaused; the loop pauses again if full

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {p.partition for p in partitions}
        log.info("partitions revoked", extra={"partitions": sorted(revoked)})
        self._commit(force=True)
        for (partition, _offset), task in list(self.tasks.items()):
            if partition in revoked:
                task.cancel()
        self.buffer = deque(m for m in self.buffer if m.partition() not in revoked)
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
