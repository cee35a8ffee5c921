"""End-to-end fixtures: the real Tansu broker and the real stage processes."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka import Message as Record

from kllm.ops.broker import EmbeddedBroker, Storage, free_port
from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin, TailReader, make_producer, produce_sync
from kllm.testing.scripted_engine import scripted_engine
from schemas import DeadLetter, Request, Response, decode, encode
from topics import REQUESTS, RESPONSES, TopicSpec, declared, provision

REPO = Path(__file__).resolve().parents[2]


def broker_storage() -> Storage:
    """The storage the suite's brokers use: memory, unless KLLM_TEST_BROKER_STORAGE says
    durable (`make test-e2e-durable`). `kllm up` in the CLI tests uses its own default."""
    storage = os.environ.get("KLLM_TEST_BROKER_STORAGE", "memory")
    if storage not in ("memory", "durable"):
        raise ValueError(f"KLLM_TEST_BROKER_STORAGE={storage!r}: memory or durable")
    return "durable" if storage == "durable" else "memory"


# Short group timeouts: join and failover in seconds, not tens of seconds (see DESIGN.md).
_FETCH_WAIT_MS = 10
FAST_GROUPS = {
    "KLLM_SESSION_TIMEOUT_MS": "2000",
    "KLLM_HEARTBEAT_INTERVAL_MS": "500",
    "KLLM_FETCH_WAIT_MAX_MS": str(_FETCH_WAIT_MS),
}
CONSUMER = {"fetch.wait.max.ms": _FETCH_WAIT_MS}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def embedded_broker(log_path: Path) -> EmbeddedBroker:
    """A broker on the suite's storage; durable data goes beside its log."""
    return EmbeddedBroker(
        log_path=log_path, storage=broker_storage(), data_dir=log_path.parent / "broker-data"
    )


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with embedded_broker(log) as b:
        provision(ConfluentTopicAdmin(b.bootstrap), declared())
        yield b


@pytest.fixture(scope="session")
def script_url() -> Iterator[str]:
    with scripted_engine() as url:
        yield url


@pytest.fixture(scope="session")
def pipeline(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, script_url: str
) -> Iterator[Supervisor]:
    run_dir = tmp_path_factory.mktemp("run")
    models = [
        {"name": "smollm2-135m"},
        # Answers on demand (toxic, PII, echo) for the moderation tests; see scripted_engine.
        {"name": "scripted", "engine": "openai", "url": script_url, "slots": 4},
    ]
    env = {
        "KLLM_MODELS": orjson.dumps(models).decode(),
        "KLLM_GATEWAY_MODELS": '["smollm2-135m", "scripted"]',
        "KLLM_GATEWAY_PORT": str(free_port()),
        # For the gateway tests: a tenant with a small quota, few callers per replica.
        "KLLM_QUOTAS": '{"quota-tenant": {"rpm": 3}}',
        "KLLM_GATEWAY_MAX_WAITING": "4",
        "KLLM_METRICS_BASE_PORT": str(free_port()),
        "KLLM_TRACE_EXPORT": "file",
        "KLLM_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KLLM_RUN_DIR": str(run_dir),
        "KLLM_QDRANT_PATH": str(run_dir / "qdrant"),
        "KLLM_SEED_DIR": str(REPO / "docs"),
        "KLLM_TOP_K": "2",
        "KLLM_DEFAULT_MAX_TOKENS": "24",
        # The scripted answers are there for the output checks: scored, never replaced
        # by quotes (test_eval.py runs the grounded default end to end).
        "KLLM_ANSWER_POLICY": "flag",
        "KLLM_EVAL_SAMPLE": "1.0",  # every answer scored online (test_online_eval.py)
        **FAST_GROUPS,
    }
    sup = Supervisor(run_dir, env)
    sup.start_all()
    try:
        sup.wait_ready(240, bootstrap=broker.bootstrap)
        yield sup
    finally:
        sup.stop_all()


class Client:
    """Publishes requests and reads replies, as a front end would."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer = make_producer(bootstrap)

    def tail(self, topic: TopicSpec) -> Replies:
        return Replies(TailReader(self.bootstrap, topic.name, CONSUMER))

    def send(self, prompt: str, **fields: object) -> str:
        req = Request(request_id=f"t-{uuid.uuid4()}", prompt=prompt, **fields)  # type: ignore[arg-type]
        produce_sync(self.producer, REQUESTS.name, req.tenant, encode(req))
        return req.request_id

    def send_raw(self, key: str, value: bytes) -> None:
        produce_sync(self.producer, REQUESTS.name, key, value)

    def responses(self, reader: Replies, ids: set[str], timeout_s: float) -> dict[str, Response]:
        return {k: decode(v, Response) for k, v in collect(reader, ids, timeout_s).items()}

    def dead_letters(
        self, reader: Replies, keys: set[str], timeout_s: float
    ) -> dict[str, DeadLetter]:
        return {k: decode(v, DeadLetter) for k, v in collect(reader, keys, timeout_s).items()}


class Replies:
    """Records of a topic from now on, by key. Records for keys nobody asked for
    yet are kept, so a later call still finds replies that arrived early."""

    def __init__(self, reader: TailReader) -> None:
        self.reader = reader
        self.seen: dict[str, bytes] = {}

    def close(self) -> None:
        self.reader.close()


def collect(replies: Replies, keys: set[str], timeout_s: float) -> dict[str, bytes]:
    """The first record for each of ``keys`` that arrives within ``timeout_s``."""
    if not keys <= replies.seen.keys():
        for key, value in replies.reader.records(timeout_s):
            if key is not None:
                replies.seen.setdefault(key, value)
            if keys <= replies.seen.keys():
                break
    return {k: replies.seen[k] for k in keys if k in replies.seen}


@pytest.fixture()
def client(broker: EmbeddedBroker) -> Client:
    return Client(broker.bootstrap)


T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], timeout_s: float, what: str | Callable[[], str], every_s: float = 0.1
) -> T:
    """Call ``probe`` until it returns something truthy, and return that. After
    ``timeout_s`` fail, saying what was awaited (``what``, or what it returns then: the
    state that was still wrong) and the last value the probe returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what if isinstance(what, str) else what()
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {said}; last probe: {value!r:.300}"
            )
        time.sleep(every_s)  # the polling interval; the wait is on the probe


class Delivered:
    """A producer's delivery callback that keeps, per partition, the end offset (last
    offset + 1) of what it delivered: what a consumer group must commit to have read it.
    The ends come from the delivery reports, not the broker's high watermark."""

    def __init__(self) -> None:
        self.ends: dict[tuple[str, int], int] = {}
        self.errors: list[str] = []

    def __call__(self, err: KafkaError | None, record: Record) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        key = (str(record.topic()), int(record.partition() or 0))
        self.ends[key] = max(self.ends.get(key, 0), int(record.offset() or 0) + 1)

    def flushed(self, producer: Producer) -> dict[tuple[str, int], int]:
        """Flush ``producer`` (whose records report here) and return the ends."""
        assert producer.flush(30) == 0, "records not delivered"
        assert not self.errors, self.errors[:3]
        return dict(self.ends)


def wait_committed(
    bootstrap: str, group: str, ends: dict[tuple[str, int], int], timeout_s: float
) -> None:
    """Wait until ``group`` has committed, on every partition of ``ends``, at least its
    end offset; reads the group's offsets without joining it."""
    reader = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    parts = [TopicPartition(t, p) for t, p in ends]
    behind: dict[tuple[str, int], int] = dict(ends)

    def caught_up() -> bool:
        committed = {(c.topic, c.partition): c.offset for c in reader.committed(parts, 10)}
        behind.clear()
        behind.update({k: end - committed.get(k, -1) for k, end in ends.items()})
        return all(lag <= 0 for lag in behind.values())

    try:
        wait_until(caught_up, timeout_s, lambda: f"{group} to commit; behind: {behind}", 0.05)
    finally:
        reader.close()


__all__ = ["RESPONSES", "Client", "Delivered", "wait_committed", "wait_until"]
