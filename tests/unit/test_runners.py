"""The consumer loops' pause, seek, commit and dead-letter logic, on in-memory doubles
(kllm.testing.kafka); the end-to-end suite runs the same loops on the real broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from kllm.runtime.batch import BatchRunner, run_batches
from kllm.runtime.checkpointed import CheckpointedRunner
from kllm.runtime.dispatch import RecordRef, error_response
from kllm.runtime.inflight import InflightRunner
from kllm.runtime.stop import Stop
from kllm.testing.kafka import FakeConsumer, FakeProducer
from processors.base import Emit
from schemas import Message, Request, Response, decode, encode
from topics import RESPONSES, RETRIEVAL

SOURCE = RETRIEVAL


def answer(rid: str) -> Response:
    return error_response(rid, "t", "test")


def echo(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
    return [Emit(RESPONSES, ref.key or "", answer(ref.key or "")) for ref, _ in records]


def filled(partitions: dict[int, int]) -> FakeConsumer:
    consumer = FakeConsumer(SOURCE.name)
    for p, n in partitions.items():
        for i in range(n):
            consumer.append(p, encode(answer(f"r{p}-{i}")), key=f"r{p}-{i}")
    return consumer


# -- micro-batch ---------------------------------------------------------------------------


def test_batch_commits_one_past_the_last_record_after_the_outputs_are_acked() -> None:
    consumer, producer = filled({0: 3, 1: 2}), FakeProducer()
    runner = BatchRunner(consumer, producer, SOURCE, echo, max_batch=10)
    consumer.assign({0, 1})
    assert runner.step() == 5
    assert len(producer.on(RESPONSES.name)) == 5
    assert consumer.committed == {(SOURCE.name, 0): 3, (SOURCE.name, 1): 2}


def test_batch_whose_output_fails_is_not_committed() -> None:
    consumer, producer = filled({0: 2}), FakeProducer(fail_topics={RESPONSES.name})
    runner = BatchRunner(consumer, producer, SOURCE, echo)
    consumer.assign({0})
    with pytest.raises(BrokerError, match="publishing failed"):
        runner.step()
    assert consumer.commits == []  # replayed after the restart


def test_batch_unacknowledged_output_is_not_committed() -> None:
    consumer, producer = filled({0: 1}), FakeProducer(hold=True)
    runner = BatchRunner(consumer, producer, SOURCE, echo)
    consumer.assign({0})
    with pytest.raises(BrokerError, match="unacknowledged"):
        runner.step()
    assert consumer.commits == []


def test_run_batches_stops_and_closes_every_runner() -> None:
    stop = Stop()
    first, second = filled({0: 1}), filled({0: 1})
    runners = [BatchRunner(c, FakeProducer(), SOURCE, echo) for c in (first, second)]
    for c in (first, second):
        c.assign({0})

    def stop_after(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
        stop.set()
        return echo(records)

    runners[1].handler = stop_after
    run_batches(runners, stop)
    assert first.closed and second.closed
    assert first.committed and second.committed


# -- in flight -----------------------------------------------------------------------------


def inflight(
    consumer: FakeConsumer,
    producer: FakeProducer,
    gate: asyncio.Event,
    capacity: int = 2,
    prefetch: int = 8,
    started: list[str] | None = None,
) -> InflightRunner:
    async def handle(ref: RecordRef, value: bytes, _publish: Callable[[Emit], None]) -> list[Emit]:
        if started is not None:
            started.append(ref.key or "")
        await gate.wait()
        return [Emit(RESPONSES, ref.key or "", answer(ref.key or ""))]

    return InflightRunner(consumer, producer, SOURCE, handle, capacity, prefetch, 0.0)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_inflight_commits_only_past_finished_records() -> None:
    async def scenario() -> tuple[FakeConsumer, FakeProducer]:
        consumer, producer, gate, stop = filled({0: 3}), FakeProducer(), asyncio.Event(), Stop()
        runner = inflight(consumer, producer, gate, capacity=2)
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0)
        consumer.assign({0})
        await until(lambda: len(runner.tasks) == 2)
        assert consumer.committed.get((SOURCE.name, 0), 0) == 0  # nothing done yet
        gate.set()
        await until(lambda: consumer.committed.get((SOURCE.name, 0)) == 3)
        stop.set()
        await task
        return consumer, producer

    consumer, producer = asyncio.run(scenario())
    assert sorted(decode(r.value or b"", Response).request_id for r in producer.records) == [
        "r0-0",
        "r0-1",
        "r0-2",
    ]
    assert consumer.closed


def test_inflight_pauses_a_full_partition_and_gives_back_what_is_beyond_its_share() -> None:
    async def scenario() -> tuple[FakeConsumer, list[str]]:
        consumer, gate, stop = filled({0: 12, 1: 1}), asyncio.Event(), Stop()
        started: list[str] = []
        runner = inflight(consumer, FakeProducer(), gate, capacity=1, prefetch=8, started=started)
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0)
        consumer.assign({0, 1})
        await until(lambda: 0 in consumer.paused)
        # Share = max(4, 8 / 2): partition 0 holds 4 buffered; the rest was given back.
        assert len(runner.buffers[0]) == 4
        assert consumer.positions[0] == 1 + 4  # one running, four buffered, then a seek
        gate.set()
        await until(lambda: consumer.committed.get((SOURCE.name, 0)) == 12)
        stop.set()
        await task
        return consumer, started

    consumer, started = asyncio.run(scenario())
    assert started.count("r0-5") == 1  # a given-back record runs once, when read again
    assert consumer.committed[(SOURCE.name, 1)] == 1


def test_inflight_revoke_cancels_and_the_new_owner_replays_what_was_unfinished() -> None:
    async def scenario() -> tuple[FakeConsumer, FakeProducer]:
        consumer, producer, gate, stop = filled({0: 4}), FakeProducer(), asyncio.Event(), Stop()
        runner = inflight(consumer, producer, gate, capacity=2)
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0)
        consumer.assign({0})
        await until(lambda: len(runner.tasks) == 2)
        consumer.assign(set())  # revoked with two records in flight
        await until(lambda: not runner.tasks)
        assert consumer.committed.get((SOURCE.name, 0), 0) == 0  # nothing past them
        consumer.assign({0})  # back: read again from the committed offset
        gate.set()
        await until(lambda: consumer.committed.get((SOURCE.name, 0)) == 4)
        stop.set()
        await task
        return consumer, producer

    _, producer = asyncio.run(scenario())
    answered = {decode(r.value or b"", Response).request_id for r in producer.records}
    assert answered == {"r0-0", "r0-1", "r0-2", "r0-3"}


def test_inflight_partition_paused_when_revoked_is_read_again_when_reassigned() -> None:
    """The kill -9 loss: the survivor's partition, paused (its buffer full) when a peer's
    death rebalanced the group, came back still paused in librdkafka, and was never read
    again. The doubles keep a pause across the revoke, as librdkafka does."""

    async def scenario() -> FakeConsumer:
        consumer, gate, stop = filled({0: 10}), asyncio.Event(), Stop()
        runner = inflight(consumer, FakeProducer(), gate, capacity=1, prefetch=1)
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0)
        consumer.assign({0})
        await until(lambda: 0 in consumer.paused)
        consumer.assign({0})  # revoked while paused, given straight back
        gate.set()
        await until(lambda: consumer.committed.get((SOURCE.name, 0)) == 10)
        stop.set()
        await task
        return consumer

    assert asyncio.run(scenario()).committed[(SOURCE.name, 0)] == 10


def test_inflight_failed_output_stops_the_runner_uncommitted() -> None:
    async def scenario() -> FakeConsumer:
        consumer, gate = filled({0: 1}), asyncio.Event()
        gate.set()
        runner = inflight(consumer, FakeProducer(fail_topics={RESPONSES.name}), gate)
        task = asyncio.create_task(runner.run(Stop()))
        await asyncio.sleep(0)
        consumer.assign({0})
        with pytest.raises(BrokerError):
            await task
        return consumer

    consumer = asyncio.run(scenario())
    assert consumer.committed.get((SOURCE.name, 0), 0) == 0


# -- checkpointed --------------------------------------------------------------------------


def test_checkpointed_saves_before_it_commits_and_skips_what_it_cannot_read() -> None:
    consumer, producer = FakeConsumer(SOURCE.name), FakeProducer()
    for rid in ("a", "b"):
        consumer.append(0, encode(Request(request_id=rid, prompt="hello")), key=rid)
    consumer.append(0, b"not json", key="bad")
    order: list[str] = []

    def process(messages: list[Message], _now: float) -> list[Emit]:
        order.append(f"process {len(messages)}")
        return [Emit(RESPONSES, "alert", answer("alert"))]

    def save() -> None:
        order.append(f"save, {len(producer.records)} acked, {len(consumer.commits)} commits")

    runner = CheckpointedRunner(consumer, producer, [SOURCE], process, save, stage="drift")
    consumer.assign({0})
    assert runner.step() == 3
    runner.persist()
    assert order == ["process 2", "save, 1 acked, 0 commits"]
    assert consumer.committed == {(SOURCE.name, 0): 3}  # the unreadable one too: skipped
    assert not producer.on(SOURCE.dlq.name)  # a side reader never dead-letters


def test_checkpointed_commits_nothing_when_the_save_fails() -> None:
    consumer = filled({0: 1})

    def save() -> None:
        raise OSError("disk full")

    runner = CheckpointedRunner(
        consumer, FakeProducer(), [SOURCE], lambda m, t: [], save, stage="drift"
    )
    consumer.assign({0})
    runner.step()
    with pytest.raises(OSError):
        runner.persist()
    assert consumer.commits == []


class _RefusingConsumer(FakeConsumer):
    """A group coordinator that is away: every commit fails, as librdkafka's does."""

    refuse = True

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        if self.refuse:
            raise KafkaException(KafkaError(KafkaError._WAIT_COORD))
        super().commit(offsets=offsets, asynchronous=asynchronous)


def test_checkpointed_keeps_running_when_the_group_refuses_a_commit() -> None:
    # The drift stage used to exit when the broker restarted mid-checkpoint.
    consumer = _RefusingConsumer(SOURCE.name)
    consumer.append(0, encode(Request(request_id="a", prompt="hello")), key="a")
    saved: list[int] = []
    runner = CheckpointedRunner(
        consumer, FakeProducer(), [SOURCE], lambda m, t: [], lambda: saved.append(1), stage="drift"
    )
    consumer.assign({0})
    runner.step()
    runner.persist()  # refused: kept for the next checkpoint
    consumer.refuse = False
    runner.persist()
    assert saved == [1, 1] and consumer.committed == {(SOURCE.name, 0): 1}


def test_checkpointed_drops_refused_offsets_when_its_partitions_are_revoked() -> None:
    consumer = _RefusingConsumer(SOURCE.name)
    consumer.append(0, encode(Request(request_id="a", prompt="hello")), key="a")
    runner = CheckpointedRunner(
        consumer, FakeProducer(), [SOURCE], lambda m, t: [], lambda: None, stage="drift"
    )
    stop = threading.Event()
    consumer.assign({0})

    def rebalance_then_stop() -> None:
        runner.step()
        consumer.on_revoke(consumer, [])  # refused: the next owner replays from the last commit
        consumer.refuse = False
        stop.set()

    runner.run(stop, on_ready=rebalance_then_stop)
    assert consumer.committed == {}  # the final checkpoint had nothing left to commit
