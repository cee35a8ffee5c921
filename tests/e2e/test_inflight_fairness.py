"""The in-flight runner shares its slots fairly between partitions under sustained load.

Against the real broker: records arrive evenly on four partitions at 1.5 times what
the handler can take; every partition must get about the same number of slots and
its records about the same wait. (Before the fix, the first partition's records took
most slots, and the last partition's waited three times as long.)
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

from kllm.ops.broker import EmbeddedBroker
from kllm.runtime.dispatch import RecordRef
from kllm.runtime.inflight import InflightRunner
from kllm.runtime.kafka import ConfluentTopicAdmin, make_consumer, make_producer
from processors.base import Emit
from schemas import Request
from tests.e2e.conftest import CONSUMER
from topics import TopicSpec, provision

SLOTS, SERVICE_S, RATE, SECONDS = 4, 0.25, 24, 8  # capacity 16/s, offered 24/s


def test_slots_go_to_every_partition_alike_under_overload(broker: EmbeddedBroker) -> None:
    spec = TopicSpec(f"test.fair.{uuid.uuid4().hex[:6]}", 4, "any", Request)
    provision(ConfluentTopicAdmin(broker.bootstrap), [spec])
    waits: dict[int, list[float]] = defaultdict(list)

    async def handle(ref: RecordRef, value: bytes, _publish: Callable[[Emit], None]) -> list[Emit]:
        waits[ref.partition].append(time.time() - float(value))
        await asyncio.sleep(SERVICE_S)  # the service time: what the slots are busy with
        return []

    async def run() -> None:
        producer = make_producer(broker.bootstrap, {"linger.ms": 1})
        group = f"fair-{uuid.uuid4().hex[:6]}"
        consumer = make_consumer(
            broker.bootstrap,
            group,
            CONSUMER | {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
        )
        runner = InflightRunner(consumer, producer, spec, handle, SLOTS)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        joined = time.monotonic() + 60
        while len(runner.assigned) < spec.partitions:  # polls the assignment, bounded
            assert time.monotonic() < joined, f"assigned only {runner.assigned} after 60 s"
            await asyncio.sleep(0.1)
        t0, sent = time.time(), 0
        while time.time() - t0 < SECONDS:
            while sent < (time.time() - t0) * RATE:
                stamp = str(time.time()).encode()
                producer.produce(spec.name, key=str(sent), value=stamp, partition=sent % 4)
                sent += 1
            producer.poll(0)
            await asyncio.sleep(0.005)  # paces the sends at RATE (part of the load offered)
        stop.set()
        await task

    asyncio.run(run())
    started = {p: len(w) for p, w in waits.items()}
    mean_wait = {p: statistics.fmean(w) for p, w in waits.items()}
    assert len(started) == 4, started
    assert max(started.values()) <= 1.25 * min(started.values()), started
    assert max(mean_wait.values()) <= 1.5 * min(mean_wait.values()), mean_wait
    # Overloaded, the slots never idle: about capacity x duration records started.
    assert sum(started.values()) >= 0.8 * SLOTS / SERVICE_S * SECONDS, started
