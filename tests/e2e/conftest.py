"""End-to-end fixtures: the real Tansu broker and the real stage processes."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from kllm.ops.broker import EmbeddedBroker
from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin, TailReader, make_producer, produce_sync
from kllm.testing.scripted_engine import scripted_engine
from schemas import DeadLetter, Request, Response, decode, encode
from topics import ALL, REQUESTS, RESPONSES, TopicSpec, provision

REPO = Path(__file__).resolve().parents[2]

# Short group timeouts: join and failover in seconds, not tens of seconds (see DESIGN.md).
FAST_GROUPS = {
    "KLLM_SESSION_TIMEOUT_MS": "2000",
    "KLLM_HEARTBEAT_INTERVAL_MS": "500",
    "KLLM_FETCH_WAIT_MAX_MS": "10",
}
CONSUMER = {"fetch.wait.max.ms": 10}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log) as b:
        provision(ConfluentTopicAdmin(b.bootstrap), ALL)
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
        **FAST_GROUPS,
    }
    sup = Supervisor(run_dir, env)
    sup.start_all()
    try:
        sup.wait_ready(240, bootstrap=broker.bootstrap)
        yield sup
    finally:
        sup.stop_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


__all__ = ["RESPONSES", "Client", "wait_until"]
