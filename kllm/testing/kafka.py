"""In-memory doubles of the Kafka clients (kllm.runtime.ports), for the runners' unit
tests: partitions, positions, pauses, seeks, commits and delivery reports, with no
broker. End-to-end tests use the real broker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from kllm.runtime.ports import Headers, OnDelivery, OnPartitions


@dataclass
class FakeRecord:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes | None
    _key: bytes | None = None
    _headers: Headers | None = None
    _timestamp: int = 0

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Headers | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)

    def error(self) -> None:
        return None


@dataclass
class FakeConsumer:
    """One topic's partitions as lists; ``assign()`` plays a rebalance."""

    topic: str
    logs: dict[int, list[FakeRecord]] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    assigned: set[int] = field(default_factory=set)
    paused: set[int] = field(default_factory=set)
    commits: list[dict[tuple[str, int], int]] = field(default_factory=list)
    closed: bool = False
    on_assign: OnPartitions | None = None
    on_revoke: OnPartitions | None = None

    def append(self, partition: int, value: bytes, key: str | None = None) -> FakeRecord:
        log = self.logs.setdefault(partition, [])
        ts = sum(len(v) for v in self.logs.values())  # arrival order across partitions
        record = FakeRecord(self.topic, partition, len(log), value, key.encode() if key else None)
        record._timestamp = ts
        log.append(record)
        return record

    @property
    def committed(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for c in self.commits:
            out.update(c)
        return out

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def assign(self, partitions: set[int]) -> None:
        """An eager rebalance (the range assignor's): revoke everything, then assign
        ``partitions`` at their committed offsets. As in librdkafka, a pause belongs to
        the partition and outlives the revoke (Java's consumer drops it)."""
        if self.assigned and self.on_revoke:
            self.on_revoke(self, [TopicPartition(self.topic, p) for p in sorted(self.assigned)])
        self.assigned = set(partitions)
        for p in self.assigned:
            self.positions[p] = self.committed.get((self.topic, p), 0)
        if self.on_assign:
            self.on_assign(self, [TopicPartition(self.topic, p) for p in sorted(partitions)])

    def consume(self, num_messages: int = 1, timeout: float = -1) -> Sequence[FakeRecord]:
        out: list[FakeRecord] = []
        for p in sorted(self.assigned - self.paused):
            log = self.logs.get(p, [])
            while self.positions.get(p, 0) < len(log) and len(out) < num_messages:
                out.append(log[self.positions[p]])
                self.positions[p] += 1
        return out

    def poll(self, timeout: float = -1) -> FakeRecord | None:
        got = self.consume(1, timeout)
        return got[0] if got else None

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def seek(self, partition: TopicPartition) -> None:
        self.positions[partition.partition] = partition.offset

    def close(self) -> None:
        self.closed = True


@dataclass
class Produced:
    topic: str
    key: str | bytes | None
    value: bytes | None
    headers: Headers | None


@dataclass
class FakeProducer:
    """Acknowledges on ``poll``/``flush``; ``fail_topics`` get a delivery error instead,
    and ``hold`` keeps every report pending (a broker that does not answer)."""

    fail_topics: set[str] = field(default_factory=set)
    hold: bool = False
    records: list[Produced] = field(default_factory=list)
    _pending: list[tuple[Produced, OnDelivery | None]] = field(default_factory=list)

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        self._pending.append((Produced(topic, key, value, headers), on_delivery))

    def poll(self, timeout: float = -1) -> int:
        if self.hold:
            return 0
        done, self._pending = self._pending, []
        for record, callback in done:
            failed = record.topic in self.fail_topics
            if not failed:
                self.records.append(record)
            if callback is not None:
                callback("delivery failed" if failed else None, record)
        return len(done)

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        return len(self._pending)

    def on(self, topic: str) -> list[Produced]:
        return [r for r in self.records if r.topic == topic]
