"""The gateway keeps its promises (issue 13), with the fakes of test_gateway: slots
freed when callers leave, publishing within a deadline, readiness, body caps before
reading, idempotency that never replays an error, and errors that say no more than
they should. Driven through raw ASGI where the test needs to control the connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient

from kllm.gateway.recent import RecentAnswers
from kllm.gateway.replies import Reply
from kllm.gateway.routes import make_app
from processors import openai_api as api
from processors.admission import idempotency_parts
from schemas import Request, Response, decode
from services.gateway import Settings, producer_config
from tests.unit.test_gateway import Rig, auth, chat, make_rig, ok
from topics import REQUESTS, RESPONSES

PATH = "/v1/chat/completions"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def answered(request: Request, **fields: Any) -> Response:
    return ok(request).model_copy(update=fields)


def replica_of(first: Rig, tmp_path: Path, **settings: Any) -> Rig:
    """Another gateway replica, for the same API keys."""
    other = make_rig(tmp_path, **settings)
    other.gw.keys, other.secret = first.gw.keys, first.secret
    return other


@dataclass
class Caller:
    """One HTTP caller at the ASGI level: sends its body (in ``chunks``), then closes
    the connection after ``leave_after_s`` (never: None). Counts the body chunks the
    app pulled and keeps what the app sent."""

    body: bytes
    headers: dict[str, str]
    chunks: int = 1
    leave_after_s: float | None = None
    path: str = PATH
    spec: str = "2.3"
    """uvicorn's; at 2.4 a server may raise OSError from a send to a broken connection."""
    send_fails: bool = False
    pulled: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)

    def _parts(self) -> list[bytes]:
        size = max(1, -(-len(self.body) // self.chunks))
        return [self.body[i : i + size] for i in range(0, len(self.body), size)] or [b""]

    async def __call__(self, app: Any) -> None:
        parts = self._parts()

        async def receive() -> dict[str, Any]:
            if self.pulled < len(parts):
                self.pulled += 1
                more = self.pulled < len(parts)
                return {"type": "http.request", "body": parts[self.pulled - 1], "more_body": more}
            if self.leave_after_s is None:
                await asyncio.Event().wait()
            if self.leave_after_s:
                await asyncio.sleep(self.leave_after_s)
            return {"type": "http.disconnect"}  # 0: gone already, as uvicorn answers then

        async def send(message: dict[str, Any]) -> None:
            if self.send_fails:
                raise OSError("connection reset by peer")
            self.sent.append(message)

        headers = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": self.spec},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("gw", 80),
        }
        await app(scope, receive, send)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    def json(self) -> Any:
        return orjson.loads(b"".join(m.get("body", b"") for m in self.sent if "body" in m))


async def serving(rig: Rig, *callers: Caller, within_s: float = 5.0) -> None:
    """Run ``callers`` against the rig's app (its gateway started), each within ``within_s``."""
    app = make_app(rig.gw)
    rig.gw.start(asyncio.get_running_loop())
    try:
        await asyncio.wait_for(asyncio.gather(*(c(app) for c in callers)), within_s)
    finally:
        rig.gw.close()


# --- 1. callers who leave -----------------------------------------------------------


def test_streaming_callers_that_leave_before_the_first_reply_free_their_slots(
    tmp_path: Path,
) -> None:
    # Never answered: without the fix each caller holds its slot until the deadline
    # (60 s), and past 64 of them the replica refuses everyone with 429.
    rig = make_rig(tmp_path, lambda _: None, gateway_timeout_s=60.0)
    body = orjson.dumps(chat(stream=True))
    callers = [Caller(body, auth(rig.secret), leave_after_s=0.02) for _ in range(100)]

    async def run() -> None:
        app = make_app(rig.gw)
        rig.gw.start(asyncio.get_running_loop())
        try:
            for wave in range(0, 100, 25):  # 25 at once: under max_waiting (64)
                batch = callers[wave : wave + 25]
                await asyncio.wait_for(asyncio.gather(*(c(app) for c in batch)), 3.0)
        finally:
            rig.gw.close()

    asyncio.run(run())
    assert [c.status for c in callers if c.status == 429] == []
    assert rig.gw.busy == 0 and rig.gw.streams == 0 and rig.gw.waiting == {}
    assert rig.router.queues == {}  # every reply subscription given back
    assert rig.producer.topics().count(REQUESTS.name) == 100


def test_a_stream_whose_caller_left_before_it_was_sent_releases_its_slot(
    rig: Rig,
) -> None:
    # Answered at once, but the connection broke: sending the response's start fails,
    # its generator never starts, so only the response itself can give the slot back.
    body = orjson.dumps(chat(stream=True))
    caller = Caller(body, auth(rig.secret), spec="2.4", send_fails=True)
    with pytest.raises(ClientDisconnect):
        asyncio.run(serving(rig, caller))
    assert rig.gw.streams == 0 and rig.router.queues == {}


def test_healthz_and_metrics_report_the_callers_holding_slots(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, lambda _: None, gateway_timeout_s=60.0)
    seen: dict[str, Any] = {}

    async def run() -> None:
        app = make_app(rig.gw)
        rig.gw.start(asyncio.get_running_loop())
        transport = httpx.ASGITransport(app=app)
        streaming = Caller(orjson.dumps(chat(stream=True)), auth(rig.secret), leave_after_s=0.3)
        task = asyncio.create_task(streaming(app))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                while not rig.gw.streams:
                    await asyncio.sleep(0.01)
                seen["health"] = (await client.get("/healthz")).json()
                seen["metrics"] = (await client.get("/metrics")).text
                await task
                seen["after"] = (await client.get("/healthz")).json()
        finally:
            rig.gw.close()

    asyncio.run(run())
    assert (seen["health"]["waiting"], seen["health"]["subscriptions"]) == (1, 1)
    assert "kllm_gateway_waiting 1.0" in seen["metrics"]
    assert (seen["after"]["waiting"], seen["after"]["subscriptions"]) == (0, 0)


# --- 2. publishing has a deadline; readiness -----------------------------------------


def test_a_publish_the_broker_never_acknowledges_is_503_within_the_publish_timeout(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, gateway_publish_timeout_s=0.3, gateway_timeout_s=30.0)
    rig.producer.acks = False  # taken, never acknowledged: a stopped broker
    callers = [
        Caller(orjson.dumps(chat()), auth(rig.secret)),
        Caller(orjson.dumps(chat(stream=True)), auth(rig.secret)),
        Caller(b'{"request_id": "r1", "rating": 5}', auth(rig.secret), path="/v1/feedback"),
    ]
    t0 = time.monotonic()
    asyncio.run(serving(rig, *callers, within_s=3.0))
    took = time.monotonic() - t0
    assert [c.status for c in callers] == [503, 503, 503]
    assert {c.json()["error"]["code"] for c in callers} == {"unavailable"}
    assert took < 1.5, took
    assert rig.gw.busy == 0 and rig.router.queues == {}


def test_the_publish_timeout_never_outlasts_the_request_deadline(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, gateway_publish_timeout_s=30.0, gateway_timeout_s=0.3)
    rig.producer.acks = False
    caller = Caller(orjson.dumps(chat()), auth(rig.secret))
    asyncio.run(serving(rig, caller, within_s=3.0))
    assert caller.status == 503


def test_the_producer_gives_up_on_a_record_after_the_publish_timeout(tmp_path: Path) -> None:
    settings = Settings(bootstrap_servers="x:1", run_dir=tmp_path, gateway_publish_timeout_s=4)
    config = producer_config(settings)
    assert config["message.timeout.ms"] == 4000  # librdkafka's default is 300000
    assert config["acks"] == "all"


def test_healthz_is_not_ready_when_the_producer_or_the_router_cannot_reach_the_broker(
    rig: Rig,
) -> None:
    with TestClient(make_app(rig.gw)) as client:
        assert rig.gw.health is not None
        rig.producer.down = True
        rig.gw.health.probe_once()
        producer_down = client.get("/healthz")
        rig.producer.down, rig.router.reaches = False, False
        rig.gw.health.probe_once()
        router_down = client.get("/healthz")
        rig.router.reaches = True
        rig.gw.health.probe_once()
        back = client.get("/healthz")
    assert producer_down.status_code == 503
    assert (producer_down.json()["producer"], producer_down.json()["ready"]) == (False, False)
    assert producer_down.json()["status"] == "broker unreachable"
    assert router_down.status_code == 503 and router_down.json()["replies"] is False
    assert back.status_code == 200 and back.json()["ready"] is True


# --- 4. bodies capped before they are read ------------------------------------------


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, gateway_max_body_bytes=2048)
    big = b"x" * 100_000
    headers = auth(rig.secret, **{"content-length": str(len(big))})
    callers = [
        Caller(big, headers, chunks=100),
        Caller(big, headers, chunks=100, path="/v1/feedback"),
    ]
    asyncio.run(serving(rig, *callers))
    for caller in callers:
        assert caller.status == 413
        error = caller.json()["error"]
        assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")
        assert set(error) == {"message", "type", "code", "param"}
        assert caller.pulled == 0  # not one chunk read
    assert rig.producer.topics() == [REQUESTS.dlq.name]  # the chat refusal, with no payload


def test_a_body_without_a_length_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, gateway_max_body_bytes=2048)
    big = b"x" * 100_000  # 100 chunks of 1000 bytes, no Content-Length (chunked)
    callers = [
        Caller(big, auth(rig.secret), chunks=100),
        Caller(big, auth(rig.secret), chunks=100, path="/v1/feedback"),
    ]
    asyncio.run(serving(rig, *callers))
    assert [c.status for c in callers] == [413, 413]
    assert [c.pulled for c in callers] == [3, 3]  # 3000 bytes read: over 2048, stop


# --- 3. idempotency -------------------------------------------------------------------


def _ask(rig: Rig, body: dict[str, Any], key: str) -> Any:
    with TestClient(make_app(rig.gw)) as client:
        return client.post(PATH, json=body, headers=auth(rig.secret, **{"idempotency-key": key}))


def test_the_request_id_names_the_key_and_the_body_alike_on_every_replica(
    tmp_path: Path,
) -> None:
    one = make_rig(tmp_path / "a")
    two = replica_of(one, tmp_path / "b")
    same = _ask(one, chat(max_tokens=8), "k1").headers["x-request-id"]
    again = _ask(two, {"max_tokens": 8, **chat(stream=False)}, "k1").headers["x-request-id"]
    other = _ask(one, chat("Another question"), "k1").headers["x-request-id"]
    assert same == again  # another replica, the same body in another order
    parts, other_parts = idempotency_parts(same), idempotency_parts(other)
    assert parts is not None and other_parts is not None
    assert parts[0] == other_parts[0] and parts[1] != other_parts[1]  # same key, new body


def test_a_key_reused_with_another_body_is_422(tmp_path: Path) -> None:
    def mismatch(request: Request) -> Response:
        reason = "this Idempotency-Key was already used with a different request body"
        return answered(request, error=reason, error_code="idempotency_mismatch")

    r = _ask(make_rig(tmp_path, mismatch), chat(), "k1")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "idempotency_mismatch")
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_error_outcome_is_never_replayed_and_the_retry_runs_again(tmp_path: Path) -> None:
    outcomes: Iterator[dict[str, Any]] = iter(
        [
            {"error": "over quota", "error_code": "quota_exceeded", "retry_after_s": 1.0},
            {"error": "engine failed", "error_code": "engine_error", "finish_reason": "error"},
            {},
        ]
    )
    rig = make_rig(tmp_path, lambda request: answered(request, **next(outcomes)))
    statuses = [_ask(rig, chat(), "k1") for _ in range(4)]
    assert [r.status_code for r in statuses] == [429, 502, 200, 200]
    published = [decode(v, Request).request_id for t, _k, v, _h in rig.producer.produced]
    assert [idempotency_parts(rid)[2] for rid in published] == [1, 2, 3]  # type: ignore[index]
    assert statuses[3].headers["x-request-id"] == published[2]  # the answer, given again


def test_a_late_retry_is_answered_from_the_responses_the_replica_saw(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    first = _ask(rig, chat(), "k1")
    # Another replica, which saw that response go by on the reply topic.
    other = replica_of(rig, tmp_path / "other")
    rid = first.headers["x-request-id"]
    assert other.gw.recent is not None
    other.gw.recent.remember(ok(Request(request_id=rid, tenant="acme", prompt="q")))
    retry = _ask(other, chat(), "k1")
    assert retry.status_code == 200 and retry.headers["x-request-id"] == rid
    assert other.producer.produced == []  # answered without publishing


def test_recent_answers_are_bounded_in_number_and_time() -> None:
    now = [0.0]
    recent = RecentAnswers(ttl_s=10.0, max_entries=3, clock=lambda: now[0])
    ids = [f"idem-{i:032x}{'a' * 16}" for i in range(5)]
    for rid in ids:
        recent.remember(ok(Request(request_id=rid, tenant="t", prompt="q")))
    assert len(recent) == 3 and recent.answer(ids[0]) is None and recent.answer(ids[4])
    recent.remember(ok(Request(request_id="chatcmpl-1", tenant="t", prompt="q")))
    assert len(recent) == 3  # only keyed requests are kept
    now[0] = 11.0
    assert recent.answer(ids[4]) is None


# --- 5. errors carry the right status and say no more than they should -----------------


def test_failures_inside_the_pipeline_are_5xx_with_no_upstream_detail(tmp_path: Path) -> None:
    upstream = "HTTP 500 from http://10.0.0.7:8000/v1/chat/completions: {'secret': 'body'}"
    cases = {
        "error": (502, "engine_error"),
        "timeout": (504, "timeout"),
        "context_length": (400, "context_length_exceeded"),
    }
    for finish, (status, code) in cases.items():

        def failed(request: Request, finish: str = finish) -> Response:
            return answered(
                request, error=upstream, error_code="engine_error", finish_reason=finish
            )

        rig = make_rig(tmp_path / finish, failed)
        with TestClient(make_app(rig.gw)) as client:
            r = client.post(PATH, json=chat(), headers=auth(rig.secret))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), finish
        assert "http" not in r.json()["error"]["message"] and "secret" not in r.text
    rig = make_rig(tmp_path / "publish")
    rig.producer.fail = True
    with TestClient(make_app(rig.gw)) as client:
        r = client.post(PATH, json=chat(), headers=auth(rig.secret))
    assert r.status_code == 503 and "queue full" not in r.text and r.headers["retry-after"]


def test_refusals_keep_their_own_words_and_statuses() -> None:
    def resp(**fields: Any) -> Response:
        return ok(Request(request_id="r", tenant="t", prompt="q"), **fields)

    quota = resp(error="tenant over quota", error_code="quota_exceeded")
    assert (api.status_for(quota), api.caller_message(quota)) == (429, "tenant over quota")
    assert api.status_for(resp(error="x", error_code="unavailable")) == 503
    assert api.status_for(resp(error="x", error_code="deadline_exceeded")) == 504
    assert not api.replayable(quota) and api.replayable(resp())
    assert api.replayable(resp(error="blocked", error_code="prompt_blocked"))


def test_callers_that_leave_before_the_answer_free_their_slots(tmp_path: Path) -> None:
    # The same for a caller waiting for a whole answer: its round trip is cancelled
    # once nobody is left to answer (before the fix: its slot was held to the deadline).
    rig = make_rig(tmp_path, lambda _: None, gateway_timeout_s=60.0)
    callers = [
        Caller(orjson.dumps(chat(f"q{i}")), auth(rig.secret), leave_after_s=0.02)
        for i in range(100)
    ]
    asyncio.run(serving(rig, *callers[:50], within_s=3.0))
    assert rig.gw.busy == 0 and rig.router.queues == {}
    rig = make_rig(tmp_path / "again", lambda _: None, gateway_timeout_s=60.0)
    asyncio.run(serving(rig, *callers[50:], within_s=3.0))
    assert rig.gw.busy == 0 and rig.router.queues == {}
    assert [c.status for c in callers if c.status == 429] == []


def test_a_caller_who_stays_still_gets_the_answer_another_caller_left(tmp_path: Path) -> None:
    answers: list[Request] = []

    def late(request: Request) -> None:
        answers.append(request)  # answered below, once the first caller has left

    rig = make_rig(tmp_path, late)
    headers = auth(rig.secret, **{"idempotency-key": "shared"})
    leaving = Caller(orjson.dumps(chat()), headers, leave_after_s=0.05)
    staying = Caller(orjson.dumps(chat()), headers)

    async def run() -> None:
        app = make_app(rig.gw)
        rig.gw.start(asyncio.get_running_loop())
        try:
            left = asyncio.create_task(leaving(app))
            while not rig.gw.waiting:
                await asyncio.sleep(0.01)
            stays = asyncio.create_task(staying(app))
            await left
            (request,) = answers
            reply = Reply(RESPONSES.name, ok(request), time.perf_counter())
            for queue in rig.router.queues[request.request_id]:
                queue.put_nowait(reply)
            await asyncio.wait_for(stays, 3.0)
        finally:
            rig.gw.close()

    asyncio.run(run())
    assert staying.status == 200 and staying.json()["choices"][0]["message"]["content"]
    assert rig.gw.busy == 0 and rig.router.queues == {}
