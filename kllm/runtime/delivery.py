"""Producing a stage's outputs and committing its inputs: the one commit-after-output rule.

Every runner publishes a record's outputs, waits until the broker acknowledges them,
and only then commits the input's offset. Had it committed first, a crash between
the two would lose the record; this way a crash replays it (at least once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from kllm.runtime.ports import Consumer, Headers, Producer
from processors.base import Emit
from schemas import encode

log = logging.getLogger(__name__)

Offsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the next offset to read, as Kafka commits it."""


def produce(producer: Producer, emit: Emit, headers: Headers | None = None, **kw: Any) -> None:
    """Produce one output, not waiting for its acknowledgement."""
    value = encode(emit.message)
    producer.produce(emit.topic.name, key=emit.key, value=value, headers=headers, **kw)


class Acks:
    """Outputs produced together, and their delivery reports: ``wait()`` returns once
    every one is acknowledged, and raises otherwise (the inputs must not be committed)."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.errors: list[str] = []

    def produce(self, emit: Emit, headers: Headers | None = None) -> None:
        self.produce_bytes(emit.topic.name, emit.key, encode(emit.message), headers)

    def produce_bytes(
        self, topic: str, key: str | None, value: bytes, headers: Headers | None = None
    ) -> None:
        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                self.errors.append(f"{topic}: {err}")

        self._producer.produce(
            topic, key=key, value=value, headers=headers, on_delivery=on_delivery
        )

    def poll(self) -> None:
        """Serve the delivery reports that have arrived, without waiting."""
        self._producer.poll(0)

    def wait(self, timeout_s: float) -> None:
        left = self._producer.flush(timeout_s)
        if left > 0 or self.errors:
            raise BrokerError(f"publishing failed: {self.errors[:3] or f'{left} unacknowledged'}")


def publish_acked(
    producer: Producer,
    emits: Iterable[Emit],
    headers: Mapping[str | None, Headers] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Produce ``emits`` (each with the headers of its key, if any) and wait for every ack."""
    acks = Acks(producer)
    for emit in emits:
        acks.produce(emit, (headers or {}).get(emit.key))
    acks.wait(timeout_s)


def produce_acked_async(
    producer: Producer,
    emit: Emit | tuple[str, str | None, bytes],
    headers: Headers | None = None,
    *,
    polled_elsewhere: bool = False,
) -> asyncio.Future[None]:
    """Produce one output (an Emit, or topic, key and bytes); the future resolves on its
    acknowledgement and fails with BrokerError. Delivery reports run inside
    ``producer.poll``: on the loop's thread, or, with ``polled_elsewhere``, on a thread
    of the caller's that polls it (the gateway's)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    topic, key, value = (
        (emit.topic.name, emit.key, encode(emit.message)) if isinstance(emit, Emit) else emit
    )

    def settle(err: Any) -> None:
        if fut.done():
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(BrokerError(f"publishing to {topic} failed: {err}"))

    def on_delivery(err: Any, _msg: Any) -> None:
        if polled_elsewhere:
            loop.call_soon_threadsafe(settle, err)
        else:
            settle(err)

    producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
    return fut


def next_offsets(records: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int], int]:
    """The offsets to commit after ``(topic, partition, offset)`` records: one past the
    highest of each partition."""
    out: dict[tuple[str, int], int] = {}
    for topic, partition, offset in records:
        out[(topic, partition)] = max(out.get((topic, partition), 0), offset + 1)
    return out


def commit(consumer: Consumer, offsets: Offsets, *, asynchronous: bool) -> None:
    """Commit ``offsets``. Call it only once the outputs of every record below them are
    acknowledged. Raises BrokerError; "nothing to commit" is not an error."""
    if not offsets:
        return
    tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
    try:
        consumer.commit(offsets=tps, asynchronous=asynchronous)
    except KafkaException as exc:
        if "NO_OFFSET" in str(exc):
            return
        raise BrokerError(f"commit failed: {exc}") from exc
