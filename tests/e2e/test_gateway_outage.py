"""A broker outage at the gateway's edge: a broker of its own, paused with SIGSTOP, and
a real gateway process in front of it. The test answers the requests itself (a
responder thread in place of the pipeline: the outage is the gateway's to handle).
While the broker is stopped a caller gets 503 within the publish timeout, not a hang
until librdkafka's 300 s message timeout, and /healthz says the replica is not ready;
after SIGCONT both recover."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kllm.gateway.keys import KeyStore
from kllm.ops.broker import EmbeddedBroker
from kllm.runtime.kafka import ConfluentTopicAdmin, TailReader, make_producer
from schemas import Request, Response, decode, encode
from tests.e2e.conftest import CONSUMER, FAST_GROUPS, embedded_broker, wait_until
from tests.e2e.gateways import gateway_process, health
from topics import (
    EMBEDDING_REQUESTS,
    EMBEDDINGS,
    FEEDBACK,
    MODERATED_TOKENS,
    REQUESTS,
    RESPONSES,
    provision,
)

PUBLISH_TIMEOUT_S = 2.0
DEADLINE_S = 10.0


class Responder:
    """Answers every request on the request topic with a fixed response."""

    def __init__(self, bootstrap: str) -> None:
        self.reader = TailReader(bootstrap, REQUESTS.name, CONSUMER)
        self.producer = make_producer(bootstrap)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for _key, value in self.reader.records(0.2):
                request = decode(value, Request)
                answer = Response(
                    request_id=request.request_id,
                    tenant=request.tenant,
                    text="Partitions keep order by key.",
                    verdict="allowed",
                    model=request.model or "",
                    finish_reason="stop",
                )
                self.producer.produce(RESPONSES.name, key=request.request_id, value=encode(answer))
            self.producer.poll(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.producer.flush(5)
        self.reader.close()


@pytest.fixture(scope="module")
def paused_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("outage-broker") / "broker.log"
    with embedded_broker(log) as broker:
        # The topics a gateway writes and reads (it refuses to start without its replies').
        specs = [REQUESTS, REQUESTS.dlq, RESPONSES, MODERATED_TOKENS, FEEDBACK]
        specs += [EMBEDDING_REQUESTS, EMBEDDINGS]
        provision(ConfluentTopicAdmin(broker.bootstrap), specs)
        yield broker


def _post(url: str, secret: str, text: str) -> httpx.Response:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": text}]}
    headers = {"authorization": f"Bearer {secret}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.mark.slow
def test_a_stopped_broker_gives_503_within_the_deadline_and_the_gateway_recovers(
    paused_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    secret = KeyStore(tmp_path / "keys.json").create("outage", "test")[1]
    env = {
        "KLLM_BOOTSTRAP_SERVERS": paused_broker.bootstrap,
        "KLLM_RUN_DIR": str(tmp_path),
        "KLLM_GATEWAY_TIMEOUT_S": str(DEADLINE_S),
        "KLLM_GATEWAY_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
        "KLLM_GATEWAY_HEALTH_INTERVAL_S": "0.5",
        **FAST_GROUPS,
    }
    responder = Responder(paused_broker.bootstrap)
    pid = paused_broker.pid
    assert pid is not None
    try:
        with gateway_process(env, tmp_path, "gateway-outage") as url:
            assert _post(url, secret, "Before the outage").status_code == 200
            assert health(url)["ready"] is True
            os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                during = _post(url, secret, "During the outage")
                took = time.monotonic() - t0
                unready = wait_until(
                    lambda: (h := health(url))["ready"] is False and h, 10.0, "not ready"
                )
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (during.status_code, during.json()["error"]["code"]) == (503, "unavailable")
            assert during.headers["retry-after"]
            assert took < DEADLINE_S and took < PUBLISH_TIMEOUT_S + 2.0, took
            print(f"503 after {took:.2f}s with the broker stopped; health: {unready}")
            wait_until(lambda: health(url)["ready"] is True, 30.0, "ready again")
            after = wait_until(
                lambda: (r := _post(url, secret, "After the outage")).status_code == 200 and r,
                30.0,
                "an answer after SIGCONT",
            )
            assert isinstance(after, httpx.Response)
            assert after.json()["choices"][0]["message"]["content"]
    finally:
        os.kill(pid, signal.SIGCONT)
        responder.close()
