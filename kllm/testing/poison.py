"""Poison records, as a careless or hostile Kafka client publishes them, and a count of
the DLQ records they got: for the poison tests and the fault benchmark."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from kllm.runtime.kafka import make_producer
from schemas import DeadLetter, decode, peek_request_id
from topics import RESPONSES, TAIL_GROUP, TopicSpec

SourceRef = tuple[str, int, int]
"""(topic, partition, offset) of a published record."""
Poison = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]] | None]
"""(key, value, headers) of one record."""
PRODUCER_MAX_BYTES = 8 * 1024 * 1024
"""The largest record published here (the embedded broker itself takes any size)."""


def shapes(topic: TopicSpec) -> list[Poison]:
    """One record of every shape a stage must survive on ``topic``."""
    rid = f"poison-{uuid.uuid4().hex[:8]}"
    schema = topic.schema.SCHEMA if topic.schema else "none"
    shaped = {"schema": schema, "v": 1, "request_id": rid}
    return [
        (b"k", None, None),  # a tombstone
        (None, None, None),
        (b"k", b"\xff\xfe\x00 not UTF-8 \x80", None),
        (b"\xff\xfe\xfa", b"{}", None),  # a key that is not UTF-8
        (b"k", b"[1,2]", [("traceparent", b"\xff\x00garbage"), ("tracestate", None)]),
        (b"k", b"{" * 3000, [("x" * 200, b"\xff" * 20_000)]),
        (b"k", orjson.dumps(shaped | {"v": 999}), None),  # a version nobody reads
        (b"k", orjson.dumps({"schema": "llm.other", "v": 1, "request_id": rid}), None),
        (b"k", orjson.dumps(shaped | {"pad": "a" * 1_500_000}), None),  # 1.5 MB
        (b"k", b"\x00" * 3_500_000, None),  # 3.5 MB of binary
    ]


def flood(topic: TopicSpec, count: int, big: int, seed: int = 0) -> Iterator[Poison]:
    """``count`` malformed records for ``topic``, ``big`` of them between 1 MB and
    ``PRODUCER_MAX_BYTES``; the rest small, of every shape, nulls and bad UTF-8 among them."""
    rng = random.Random(seed)
    small = [p for p in shapes(topic) if p[1] is None or len(p[1]) < 1_000_000]
    big_at = set(rng.sample(range(count), min(big, count)))
    for i in range(count):
        if i in big_at:
            size = rng.randint(1_000_001, PRODUCER_MAX_BYTES - 1024)
            rid = f"poison-big-{i}"
            head = orjson.dumps({"schema": "llm.request", "v": 1, "request_id": rid, "pad": ""})
            yield (f"big-{i}".encode(), head[:-2] + b"x" * (size - len(head)) + b'"}', None)
        else:
            key, value, headers = small[i % len(small)]
            if value is not None and rng.random() < 0.3:  # vary the bytes, keep the shape
                value = value + rng.randbytes(rng.randint(1, 40))
            yield key, value, headers


def publish(bootstrap: str, records: Sequence[tuple[TopicSpec, Poison]]) -> set[SourceRef]:
    """Publish every record; where each landed."""
    producer = make_producer(bootstrap, {"message.max.bytes": PRODUCER_MAX_BYTES + 4096})
    sent: set[SourceRef] = set()
    errors: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            sent.add((msg.topic(), msg.partition(), msg.offset()))

    for topic, (key, value, headers) in records:
        while True:
            try:
                producer.produce(
                    topic.name, key=key, value=value, headers=headers, on_delivery=report
                )
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if left or errors:
        raise AssertionError(f"poison not delivered: {left} left, errors {errors[:3]}")
    return sent


def dlq_counts(
    bootstrap: str, topics: Sequence[TopicSpec], quiet_s: float = 2.0
) -> Counter[SourceRef]:
    """How many DLQ records each source offset has: the DLQs of ``topics`` read from the
    start until nothing new came for ``quiet_s``."""
    counts: Counter[SourceRef] = Counter()
    for value in _read_from_start(bootstrap, [(t.dlq.name, 0) for t in topics], quiet_s):
        letter = decode(value, DeadLetter)
        counts[(letter.source_topic, letter.partition, letter.offset)] += 1
    return counts


def answer_counts(bootstrap: str, quiet_s: float = 2.0) -> Counter[str]:
    """How many answers each request id has on the responses topic, read from the start."""
    where = [(RESPONSES.name, p) for p in range(RESPONSES.partitions)]
    values = _read_from_start(bootstrap, where, quiet_s)  # poison among them (other tests)
    return Counter(rid for v in values if (rid := peek_request_id(v)) is not None)


def _read_from_start(
    bootstrap: str, partitions: Sequence[tuple[str, int]], quiet_s: float
) -> Iterator[bytes]:
    """The values of ``partitions`` from offset 0 until nothing new came for ``quiet_s``."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": TAIL_GROUP,
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    reader.assign([TopicPartition(t, p, 0) for t, p in partitions])
    try:
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until:
            for msg in reader.consume(500, timeout=0.2):
                if msg.error() is None:
                    quiet_until = time.monotonic() + quiet_s
                    yield msg.value() or b""
    finally:
        reader.close()
