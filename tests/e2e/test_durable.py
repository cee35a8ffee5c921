"""`kllm up` on its durable default: kill -9 of the broker and its storage server mid-load,
then Ctrl-C and a second start, and the data is all still there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from kllm.ops.broker import EmbeddedBroker, Storage
from kllm.runtime.kafka import ConfluentTopicAdmin, make_producer
from kllm.testing.scripted_engine import scripted_engine
from schemas import DeadLetter, Document, Feedback, Request, Response, decode, encode
from tests.e2e.conftest import wait_until
from tests.e2e.test_cli import _env, start_up
from topics import (
    DOCUMENTS,
    FEEDBACK,
    FEEDBACK_ENRICHED,
    REQUESTS,
    RESPONSES,
    primary_group,
    provision,
)

LOAD_S = 12.0
RATE = 8  # requests per second
DOCS = 6


def _stop(up: subprocess.Popen[str], lines: list[str]) -> str:
    up.send_signal(signal.SIGINT)  # Ctrl-C
    rest, _ = up.communicate(timeout=90)
    assert up.returncode == 0, "".join(lines) + rest
    return "".join(lines) + rest


def _bootstrap(run: Path) -> str:
    return str(orjson.loads((run / "state.json").read_bytes())["bootstrap_servers"])


def _read_all(
    bootstrap: str, topic: str, partitions: int, timeout_s: float = 120.0
) -> list[tuple[bytes | None, bytes]]:
    """Every record of ``topic`` from its beginning (group-less): read until each partition
    reaches the end offset it had when the read began, then 1 s of quiet. The durable
    engine can take seconds to answer a fetch on a busy host (one object per batch), so a
    quiet spell alone is no end: a 3 s quiet once ended the read with records unread."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    tps = [TopicPartition(topic, p, 0) for p in range(partitions)]
    out: list[tuple[bytes | None, bytes]] = []
    try:
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        at = dict.fromkeys(ends, 0)
        consumer.assign(tps)
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while any(at[p] < ends[p] for p in ends) or time.monotonic() - quiet_since < 1.0:
            if time.monotonic() > deadline:
                short = {p: (at[p], ends[p]) for p in ends if at[p] < ends[p]}
                raise AssertionError(f"{topic}: not read to its end in {timeout_s:g}s: {short}")
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            quiet_since = time.monotonic()
            at[msg.partition()] = (msg.offset() or 0) + 1
            out.append((msg.key(), msg.value() or b""))
    finally:
        consumer.close()
    return out


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in got}


class _Load:
    """Requests at a steady rate from a thread; what the broker acknowledged is kept."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.acked: set[str] = set()
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        for i in range(int(LOAD_S * RATE)):
            time.sleep(max(0.0, start + i / RATE - time.monotonic()))
            req = Request(request_id=f"dur-{i}-{uuid.uuid4().hex[:8]}", prompt=f"question {i}")

            def on_delivery(
                err: KafkaError | None, _msg: object, rid: str = req.request_id
            ) -> None:
                (self.failed.append if err else self.acked.add)(rid)

            self.producer.produce(
                REQUESTS.name, key=req.tenant, value=encode(req), on_delivery=on_delivery
            )
            self.producer.poll(0)
        self.producer.flush(120)


@pytest.mark.slow
def test_durable_up_loses_nothing_to_kill_9_nor_to_a_restart(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = _env(tmp_path) | {"KLLM_GATEWAY_MODELS": '["scripted"]'}
    env.pop("KLLM_BROKER_STORAGE", None)  # the default: durable
    with scripted_engine() as script:
        env["KLLM_MODELS"] = f'[{{"name": "scripted", "engine": "openai", "url": "{script}"}}]'
        up, lines = start_up(env)
        try:
            head = "".join(lines)
            found = re.search(r"pid (\d+)  \(durable, data in .*, storage server pid (\d+)\)", head)
            assert found, head
            broker_pid, storage_pid = int(found[1]), int(found[2])
            bootstrap = _bootstrap(run)
            producer = make_producer(bootstrap)
            docs = [
                Document(tenant="durable", doc_id=f"doc-{i}", text=f"Fact number {i}.")
                for i in range(DOCS)
            ]
            for doc in docs:
                producer.produce(
                    DOCUMENTS.name, key=f"{doc.tenant}/{doc.doc_id}", value=encode(doc)
                )
            producer.produce(REQUESTS.name, key="default", value=b"not json at all")  # a DLQ record
            producer.flush(30)

            load = _Load(make_producer(bootstrap))
            load.thread.start()
            time.sleep(LOAD_S / 2)
            before = _committed(
                bootstrap, primary_group("ingestion").name, REQUESTS.name, REQUESTS.partitions
            )
            os.kill(storage_pid, signal.SIGKILL)
            os.kill(broker_pid, signal.SIGKILL)
            load.thread.join(180)
            assert not load.failed, f"{len(load.failed)} requests refused"
            sent = load.acked
            assert len(sent) == int(LOAD_S * RATE)

            seen: Counter[str] = Counter()

            def answers() -> Counter[str]:
                got = _read_all(bootstrap, RESPONSES.name, RESPONSES.partitions)
                seen.clear()
                seen.update(decode(v, Response).request_id for _k, v in got)
                return seen.copy() if sent <= seen.keys() else Counter()

            def unanswered() -> str:
                missing = sorted(sent - seen.keys())
                dead = _read_all(bootstrap, REQUESTS.dlq.name, REQUESTS.dlq.partitions)
                reasons = [decode(v, DeadLetter).reason[:120] for _k, v in dead]
                return (
                    f"every acknowledged request answered: {len(missing)} of {len(sent)} "
                    f"missing, e.g. {missing[:5]}; dead letters: {reasons[:5]}"
                )

            # A busy machine can take minutes: every stage rejoins its group on the new broker.
            wait_until(answers, 300, unanswered)
            time.sleep(5)  # a replay's second answer would come now
            # Once: a request in flight at the kill is processed again (its offset was
            # not committed), but its answer was acknowledged, and the answer ledger
            # drops the second one (kllm.runtime.ledger).
            answered = answers()
            twice = sorted(rid for rid, n in answered.items() if rid in sent and n > 1)
            assert not twice, f"{len(twice)} of {len(sent)} answered more than once: {twice}"

            after = _committed(
                bootstrap, primary_group("ingestion").name, REQUESTS.name, REQUESTS.partitions
            )
            assert max(before.values()) > 0, before  # committed before the kill
            assert all(after[p] >= before[p] for p in before), (before, after)

            for rid in sorted(sent)[:10]:
                fb = Feedback(request_id=rid, rating=4)
                producer.produce(FEEDBACK.name, key=rid, value=encode(fb))
            producer.flush(30)
            rated = set(sorted(sent)[:10])
            wait_until(
                lambda: (
                    rated <= _keys(bootstrap, FEEDBACK_ENRICHED.name, FEEDBACK_ENRICHED.partitions)
                ),
                120,
                "the enriched feedback of every rating",
            )
        finally:
            out = _stop(up, lines) if up.poll() is None else "".join(lines)
        assert "embedded broker restarted" in out and "embedded storage server restarted" in out, (
            out
        )

        # Started again: nothing was lost with the stop.
        up, lines = start_up(env)
        try:
            assert "topics: 0 created" in "".join(lines)
            bootstrap = _bootstrap(run)
            kept = {
                decode(v, Document).doc_id
                for _k, v in _read_all(bootstrap, DOCUMENTS.name, DOCUMENTS.partitions)
            }
            assert {d.doc_id for d in docs} <= kept
            assert rated <= _keys(bootstrap, FEEDBACK_ENRICHED.name, FEEDBACK_ENRICHED.partitions)
            dead = _read_all(bootstrap, REQUESTS.dlq.name, REQUESTS.dlq.partitions)
            reasons = [decode(v, DeadLetter).reason for _k, v in dead]
            assert any("not valid JSON" in r for r in reasons), reasons
        finally:
            _stop(up, lines)


def _keys(bootstrap: str, topic: str, partitions: int) -> set[str]:
    return {k.decode() for k, _v in _read_all(bootstrap, topic, partitions) if k}


@pytest.mark.parametrize("storage", ["memory", "durable"])
def test_a_group_resumes_inside_a_produced_batch(tmp_path: Path, storage: Storage) -> None:
    """A commit can fall inside a batch of records (the producer lingers). The durable engine
    stores each batch as one object named by its first offset; resuming from an offset
    inside it must still return the rest of that batch, after a broker restart too."""
    data = tmp_path / "data"
    group = f"mid-batch-{uuid.uuid4().hex[:6]}"
    with EmbeddedBroker(storage=storage, data_dir=data, log_path=tmp_path / "a.log") as b:
        provision(ConfluentTopicAdmin(b.bootstrap), [REQUESTS])
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 200})
        for batch in range(2):  # two batches of five: offsets 0-4 and 5-9
            for i in range(5):
                producer.produce(REQUESTS.name, value=f"v{batch * 5 + i}".encode(), partition=0)
            producer.flush(30)
        assert _group_reads(b.bootstrap, group, stop_after=3) == [0, 1, 2]  # commits 3
        if storage == "memory":  # memory forgets on restart: resume on the same broker
            assert _group_reads(b.bootstrap, group, stop_after=7) == list(range(3, 10))
            return
    batches = [p for p in data.rglob("*.batch") if f"/{REQUESTS.name}/" in p.as_posix()]
    assert len(batches) == 2, batches  # so offset 3 did lie inside a stored batch
    with EmbeddedBroker(storage=storage, data_dir=data, log_path=tmp_path / "b.log") as b:
        assert _group_reads(b.bootstrap, group, stop_after=7) == list(range(3, 10))


def _group_reads(bootstrap: str, group: str, *, stop_after: int) -> list[int]:
    """Offsets of partition 0 read by ``group`` from its commit; commits after each one."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "session.timeout.ms": 2000,  # the broker drops the last member fast (DESIGN.md)
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([REQUESTS.name])
    got: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < stop_after and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None or msg.partition() != 0:
                continue
            got.append(msg.offset())
            consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()
    return got
