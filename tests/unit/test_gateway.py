"""The gateway's HTTP surface with a fake producer and a fake reply router: statuses,
error bodies, headers, replays, streams, admission. No Kafka."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException
from starlette.testclient import TestClient

from kllm.gateway.keys import KeyStore
from kllm.gateway.replies import Reply
from kllm.gateway.routes import make_app
from kllm.gateway.service import Gateway
from schemas import Feedback, Request, Response, decode
from services.gateway import Settings, build
from topics import FEEDBACK, REQUESTS, RESPONSES

Answer = Callable[[Request], Response | None]


def ok(request: Request, **fields: Any) -> Response:
    return Response(
        request_id=request.request_id,
        tenant=request.tenant,
        text="Kafka is a log.",
        verdict="allowed",
        model=request.model or "",
        finish_reason="stop",
        **fields,
    )


@dataclass
class FakeRouter:
    alive: bool = True
    reaches: bool = True
    queues: dict[str, list[asyncio.Queue[Reply]]] = field(default_factory=dict)
    started: bool = False
    closed: bool = False

    def reachable(self, _timeout_s: float) -> bool:
        return self.alive and self.reaches

    def waiting(self) -> int:
        return len(self.queues)

    def start(self, _loop: asyncio.AbstractEventLoop) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True

    def subscribe(self, rid: str) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self.queues.setdefault(rid, []).append(queue)
        return queue

    def unsubscribe(self, rid: str, queue: asyncio.Queue[Reply]) -> None:
        self.queues.get(rid, []).remove(queue)
        if not self.queues.get(rid):
            self.queues.pop(rid, None)


@dataclass
class FakeProducer:
    """Acknowledges every record at once; a published request is answered by ``answer``
    (None: never answered), delivered through the router as the pipeline would."""

    router: FakeRouter
    answer: Answer = ok
    produced: list[tuple[str, str, bytes, Any]] = field(default_factory=list)
    fail: bool = False
    acks: bool = True
    """False: records are taken but never acknowledged (a broker that stopped)."""
    down: bool = False
    """True: metadata requests fail (the health probe's view of a broker outage)."""
    flushed: bool = False

    def list_topics(self, _topic: str, timeout: float) -> object:
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return object()

    def produce(self, topic: str, *, key: str, value: bytes, **kw: Any) -> None:
        if self.fail:
            raise BufferError("queue full")
        self.produced.append((topic, key, value, kw.get("headers")))
        if topic == REQUESTS.name:
            request = decode(value, Request)
            response = self.answer(request)
            if response is not None:
                reply = Reply(RESPONSES.name, response, time.perf_counter())
                for queue in self.router.queues.get(request.request_id, []):
                    queue.put_nowait(reply)
        if "on_delivery" in kw and self.acks:
            kw["on_delivery"](None, None)

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0

    def flush(self, _timeout: float) -> int:
        self.flushed = True
        return 0

    def topics(self) -> list[str]:
        return [p[0] for p in self.produced]


@dataclass
class Rig:
    gw: Gateway
    producer: FakeProducer
    router: FakeRouter
    secret: str


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def make_rig(tmp_path: Path, answer: Answer = ok, **settings: Any) -> Rig:
    keys = KeyStore(tmp_path / "keys.json")
    _, secret = keys.create("acme")
    router = FakeRouter()
    producer = FakeProducer(router, answer)
    config = Settings(bootstrap_servers="fake:9092", run_dir=tmp_path, **settings)
    gw = build(config, producer=producer, router=router, keys=keys)  # type: ignore[arg-type]
    return Rig(gw, producer, router, secret)


def chat(text: str = "What is Kafka?", **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": text}], **extra}


def auth(secret: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}", **headers}


def test_a_request_is_published_and_answered_with_timing_headers(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=chat(), headers=auth(rig.secret))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Kafka is a log."
    assert body["id"] == r.headers["x-request-id"]
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    for header in ("x-kllm-pipeline-ms", "x-kllm-gateway-ms", "x-kllm-trace-id"):
        assert header in r.headers
    assert rig.producer.topics() == [REQUESTS.name]
    _, key, _, headers = rig.producer.produced[0]
    assert key == "acme"
    assert headers is not None
    assert rig.router.started and rig.router.closed and rig.producer.flushed
    assert rig.router.queues == {}  # nobody left waiting


@pytest.mark.parametrize(
    "headers,status,code",
    [({}, 401, "invalid_api_key"), ({"authorization": "Bearer nope"}, 401, "invalid_api_key")],
)
def test_a_missing_or_wrong_key_is_refused(
    rig: Rig, headers: dict[str, str], status: int, code: str
) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=chat(), headers=headers)
        models = client.get("/v1/models", headers=headers)
        feedback = client.post("/v1/feedback", json={"request_id": "x", "rating": 5})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert models.status_code == feedback.status_code == 401
    assert rig.producer.produced == []


@pytest.mark.parametrize(
    "body,status,code",
    [
        (b"{not json", 400, "invalid_request"),
        (orjson.dumps({"model": "smollm2-135m", "messages": []}), 400, "invalid_request"),
        (orjson.dumps(chat() | {"model": "gpt-9"}), 404, "model_not_found"),
        (orjson.dumps(chat("x" * 300_000)), 413, "request_too_large"),
    ],
)
def test_a_refused_body_is_an_error_and_a_dead_letter(
    rig: Rig, body: bytes, status: int, code: str
) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", content=body, headers=auth(rig.secret))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert rig.producer.topics() == [REQUESTS.dlq.name]


def test_an_error_reply_maps_to_its_status_with_retry_after(tmp_path: Path) -> None:
    def quota(request: Request) -> Response:
        return ok(request, error="over quota", error_code="quota_exceeded", retry_after_s=2.4)

    rig = make_rig(tmp_path, quota)
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=chat(), headers=auth(rig.secret))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"] == {
        "message": "over quota",
        "type": r.json()["error"]["type"],
        "code": "quota_exceeded",
        "param": None,
    }


def test_a_repeated_idempotency_key_is_answered_from_the_replay_cache(rig: Rig) -> None:
    headers = auth(rig.secret, **{"idempotency-key": "k1"})
    with TestClient(make_app(rig.gw)) as client:
        first = client.post("/v1/chat/completions", json=chat(), headers=headers)
        second = client.post("/v1/chat/completions", json=chat(), headers=headers)
        streamed = client.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert first.status_code == second.status_code == streamed.status_code == 200
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert first.headers["x-request-id"].startswith("idem-")
    assert rig.producer.topics() == [REQUESTS.name]  # published once
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert "Kafka is a log." in streamed.text


def test_a_stream_serves_sse_from_the_first_reply(rig: Rig) -> None:
    rig.producer.answer = lambda request: ok(request, cached=True)
    body = chat(stream=True, stream_options={"include_usage": True})
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=body, headers=auth(rig.secret))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "x-kllm-first-reply-ms" in r.headers and "x-kllm-trace-id" in r.headers
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "Kafka is a log." in r.text
    assert rig.gw.streams == 0 and rig.router.queues == {}


def test_a_stream_whose_first_reply_is_an_error_is_an_http_error(rig: Rig) -> None:
    rig.producer.answer = lambda request: ok(request, error="no", error_code="prompt_blocked")
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True), headers=auth(rig.secret))
    assert (r.status_code, r.json()["error"]["code"]) == (400, "prompt_blocked")
    assert rig.gw.streams == 0


def test_a_failed_publish_is_503(rig: Rig) -> None:
    rig.producer.fail = True
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=chat(), headers=auth(rig.secret))
    assert (r.status_code, r.json()["error"]["code"]) == (503, "unavailable")


def test_callers_beyond_max_waiting_are_shed_and_the_waiting_time_out(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, lambda _: None, gateway_max_waiting=1, gateway_timeout_s=0.1)
    app = make_app(rig.gw)

    async def two() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            slow = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat(), headers=auth(rig.secret))
            )
            while not rig.gw.waiting:
                await asyncio.sleep(0.01)
            shed = await client.post(
                "/v1/chat/completions", json=chat("again"), headers=auth(rig.secret)
            )
            return [await slow, shed]

    slow, shed = asyncio.run(two())
    assert (shed.status_code, shed.json()["error"]["code"]) == (429, "overloaded")
    assert shed.headers["retry-after"] == "1"
    assert (slow.status_code, slow.json()["error"]["code"]) == (504, "timeout")
    assert rig.gw.waiting == {}


def test_feedback_is_published_and_accepted(rig: Rig) -> None:
    rating = {"request_id": "chatcmpl-1", "rating": 4, "comment": "good"}
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/feedback", json=rating, headers=auth(rig.secret))
        bad = client.post("/v1/feedback", json={"rating": 9}, headers=auth(rig.secret))
    assert r.status_code == 202
    assert r.json() == {"status": "accepted", "request_id": "chatcmpl-1"}
    assert bad.status_code == 400
    assert rig.producer.topics() == [FEEDBACK.name, REQUESTS.dlq.name]
    message = decode(rig.producer.produced[0][2], Feedback)
    assert (message.tenant, message.rating, message.request_id) == ("acme", 4, "chatcmpl-1")


def test_models_health_and_metrics(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        models = client.get("/v1/models", headers=auth(rig.secret))
        health = client.get("/healthz")
        metrics = client.get("/metrics")
        rig.router.alive = False
        down = client.get("/healthz")
    assert models.json() == {
        "object": "list",
        "data": [
            {
                "id": "smollm2-135m",
                "object": "model",
                "created": 0,
                "owned_by": "kllm",
                "kllm": {"pool": "default"},
            }
        ],
    }
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "ready": True,
        "producer": True,
        "replies": True,
        "waiting": 0,
        "streams": 0,
        "subscriptions": 0,
    }
    assert metrics.status_code == 200 and "kllm_gateway" in metrics.text
    assert (down.status_code, down.json()["status"]) == (503, "reply router stopped")


def test_unknown_paths_and_methods(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        assert client.get("/v1/chat/completions").status_code == 405
        assert client.get("/nowhere").status_code == 404
