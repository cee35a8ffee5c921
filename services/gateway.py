"""Gateway: the OpenAI chat completions API in front of the request topic.

A caller's key names its tenant; the request is published to the request topic
and the caller waits for its reply, which the reply router brings back by
request id to whichever replica holds the connection. Cheap refusals happen
here, before Kafka: a missing or wrong key (401), a malformed body (400), an
unknown model (404), too many callers already waiting (429). Everything else
(quotas, duplicates, guardrails) is ingestion's, and comes back as an error
reply that maps to its HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import KafkaException, Producer
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route

from kllm.core.errors import ConfigError, PipelineError
from kllm.gateway.dashboard import PAGE
from kllm.gateway.http import HttpError, error_response, replayed, reply_error, settle
from kllm.gateway.keys import KeyStore
from kllm.gateway.live import LiveStream
from kllm.gateway.monitor import PipelineMonitor
from kllm.gateway.replies import Reply, ReplyRouter
from kllm.runtime import logs, tracing
from kllm.runtime.kafka import make_producer
from kllm.runtime.metrics import GatewayMetrics
from kllm.runtime.settings import StageSettings
from processors import openai_api as api
from schemas import DeadLetter, Feedback, Request, Response, encode
from topics import FEEDBACK, MODERATED_TOKENS, REQUESTS, RESPONSES

STAGE = "gateway"
log = logging.getLogger(__name__)


class Settings(StageSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_keys_file: Path | None = None
    """API keys (hashed); default: keys.json in the run folder (`kllm keys create`)."""
    gateway_models: list[str] = Field(default_factory=lambda: ["smollm2-135m"])
    """Model names callers may ask for (served by the inference pools)."""
    gateway_max_waiting: int = Field(default=64, ge=1)
    """Callers this replica lets wait at once; beyond that: 429 with Retry-After."""
    gateway_retry_after_s: int = Field(default=1, ge=1)
    gateway_keep_alive_s: int = Field(default=75, ge=1)
    """How long an idle client connection stays open. Longer than clients' pools keep
    idle connections, so a client rarely sends on a connection the server is closing."""
    gateway_timeout_s: float = Field(default=60.0, gt=0)
    """The request's deadline: past it the pipeline gives up and the caller gets 504."""
    gateway_max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    gateway_replay_ttl_s: float = Field(default=600.0, ge=0)
    """How long an answer is kept for a caller repeating its Idempotency-Key."""

    def keys_path(self) -> Path:
        return self.gateway_keys_file or self.run_dir / "keys.json"


@dataclass
class Outcome:
    response: Response
    pipeline_s: float


@dataclass
class Gateway:
    settings: Settings
    keys: KeyStore
    producer: Producer
    router: ReplyRouter
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    waiting: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    replays: OrderedDict[str, tuple[float, Outcome]] = field(default_factory=OrderedDict)
    streams: int = 0
    _monitor: PipelineMonitor | None = None

    def monitor(self) -> PipelineMonitor:
        """Started on the first dashboard visit: until then no replica tails every topic."""
        if self._monitor is None:
            self._monitor = PipelineMonitor(self.settings.bootstrap())
            self._monitor.start()
        return self._monitor

    def tenant(self, http: HttpRequest) -> str:
        scheme, _, secret = http.headers.get("authorization", "").partition(" ")
        tenant = self.keys.tenant_for(secret.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise HttpError(401, "invalid_api_key", "missing or invalid API key")
        return tenant

    def dead_letter(self, tenant: str, raw: bytes, exc: HttpError) -> None:
        """A body refused here is kept on the request DLQ like any other refusal
        (fire and forget: the caller's answer does not wait for it)."""
        letter = DeadLetter(
            stage=STAGE,
            reason=f"HTTP {exc.status} {exc.code}: {exc}",
            source_topic="http:/v1/chat/completions",
            partition=-1,
            offset=-1,
            key=tenant,
            payload_b64=base64.b64encode(raw[: self.settings.gateway_max_body_bytes]).decode(),
        )
        try:
            self.producer.produce(REQUESTS.dlq.name, key=tenant, value=encode(letter))
        except (BufferError, KafkaException) as err:
            log.warning("refusal not dead-lettered", extra={"reason": str(err)})

    def request_id(self, http: HttpRequest, tenant: str) -> str:
        key = http.headers.get("idempotency-key")
        if not key:
            return f"chatcmpl-{uuid.uuid4().hex}"
        # Scoped by tenant: two tenants' keys never name the same request.
        return "idem-" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:40]

    async def answer(self, request: Request) -> Outcome:
        """Publish once per request id; callers repeating it share the answer."""
        rid = request.request_id
        now = time.monotonic()
        kept = self.replays.get(rid)
        if kept is not None and kept[0] > now:
            return kept[1]
        if rid in self.waiting:
            return await asyncio.shield(self.waiting[rid])
        self._admit()
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = future
        try:
            outcome = await self._round_trip(request)
            future.set_result(outcome)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning if nobody shared it
            raise
        finally:
            del self.waiting[rid]
        self._keep(rid, outcome)
        return outcome

    def fresh(self, rid: str) -> bool:
        """Neither waited for nor answered lately: a stream of its own, not a replay."""
        return rid not in self.waiting and rid not in self.replays

    def _admit(self) -> None:
        busy = len(self.waiting) + self.streams
        if busy >= self.settings.gateway_max_waiting:
            self.metrics.shed.inc()
            raise HttpError(
                429,
                "overloaded",
                f"{busy} requests are already waiting here; retry shortly",
                retry_after=self.settings.gateway_retry_after_s,
            )

    async def stream(self, request: Request, include_usage: bool, t0: float) -> HttpResponse:
        """Publish, wait for the first reply, then stream moderated windows as SSE. An
        error reply before any window is an HTTP error, as for a non-streamed call."""
        self._admit()
        rid = request.request_id
        queue = self.router.subscribe(rid)
        self.streams += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.streams -= 1
                self.router.unsubscribe(rid, queue)

        live = LiveStream(
            queue,
            release,
            rid,
            request.model or "",
            request.deadline_at or time.time(),
            include_usage,
        )
        try:
            await self._publish(request)
            first = await live.next_reply()
        except TimeoutError as exc:
            release()
            raise HttpError(504, "timeout", "no answer before the request's deadline") from exc
        except BaseException:
            release()
            raise
        if isinstance(first.message, Response) and first.message.error is not None:
            release()
            raise reply_error(first.message)
        first_s = first.received_at - t0
        cached = isinstance(first.message, Response) and first.message.cached
        self.metrics.observe_ok(first_s, 0.0, cached)
        headers = {"x-request-id": rid, "x-kllm-first-reply-ms": f"{first_s * 1000:.3f}"}
        log.info("streaming", extra={"request_id": rid})
        return StreamingResponse(
            live.events(first), headers=headers, media_type="text/event-stream"
        )

    async def _round_trip(self, request: Request) -> Outcome:
        queue = self.router.subscribe(request.request_id)
        try:
            t0 = time.perf_counter()
            await self._publish(request)
            reply = await self._reply(queue, request)
            assert isinstance(reply.message, Response)
            return Outcome(reply.message, reply.received_at - t0)
        finally:
            self.router.unsubscribe(request.request_id, queue)

    async def _publish(self, request: Request) -> None:
        await self.publish(REQUESTS.name, request.tenant, encode(request))

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        """Produce and wait for the broker's acknowledgement (503 if it fails)."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: object, _msg: object) -> None:
            loop.call_soon_threadsafe(settle, acked, err)

        try:
            self.producer.produce(
                topic,
                key=key,
                value=value,
                headers=tracing.headers_for(),  # the caller's span: the trace goes on in Kafka
                on_delivery=on_delivery,
            )
        except (BufferError, KafkaException) as exc:
            raise HttpError(503, "unavailable", f"cannot publish the request: {exc}") from exc
        await acked

    async def _reply(self, queue: asyncio.Queue[Reply], request: Request) -> Reply:
        left = (request.deadline_at or time.time()) - time.time() + 1.0
        try:
            while True:
                reply = await asyncio.wait_for(queue.get(), timeout=max(left, 0.01))
                if reply.topic == RESPONSES.name:
                    return reply
        except TimeoutError as exc:
            raise HttpError(504, "timeout", "no answer before the request's deadline") from exc

    def _keep(self, rid: str, outcome: Outcome) -> None:
        if not rid.startswith("idem-") or self.settings.gateway_replay_ttl_s <= 0:
            return
        now = time.monotonic()
        self.replays[rid] = (now + self.settings.gateway_replay_ttl_s, outcome)
        while self.replays and next(iter(self.replays.values()))[0] <= now:
            self.replays.popitem(last=False)


async def parse(gw: Gateway, http: HttpRequest, tenant: str) -> api.ChatCompletionRequest:
    """The body as a chat request for a served model; refusals are dead-lettered."""
    raw = await http.body()
    try:
        if len(raw) > gw.settings.gateway_max_body_bytes:
            raise HttpError(413, "invalid_request", f"body of {len(raw)} bytes is too large")
        try:
            chat_request = api.parse_chat_request(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, "invalid_request", f"body is not JSON: {exc}") from exc
        except PipelineError as exc:
            raise HttpError(400, "invalid_request", str(exc)) from exc
        if chat_request.model not in gw.settings.gateway_models:
            known = ", ".join(gw.settings.gateway_models)
            raise HttpError(
                404, "model_not_found", f"model {chat_request.model!r} is not served ({known})"
            )
    except HttpError as exc:
        gw.dead_letter(tenant, raw, exc)
        raise
    return chat_request


def make_app(gw: Gateway) -> Starlette:
    async def chat(http: HttpRequest) -> HttpResponse:
        name = "POST /v1/chat/completions"
        with tracing.server_span("gateway", name, http.headers.items()) as span:
            response = await answer_chat(http)
            span.set_attribute("http.response.status_code", response.status_code)
            span.set_attribute("kllm.request_id", response.headers.get("x-request-id", ""))
            response.headers["x-kllm-trace-id"] = tracing.trace_id(span)
            return response

    async def answer_chat(http: HttpRequest) -> HttpResponse:
        t0 = time.perf_counter()
        try:
            tenant = gw.tenant(http)
            chat_request = await parse(gw, http, tenant)
            request = api.to_request(
                chat_request,
                request_id=gw.request_id(http, tenant),
                tenant=tenant,
                model=chat_request.model,
                timeout_s=gw.settings.gateway_timeout_s,
            )
            if chat_request.stream and gw.fresh(request.request_id):
                include_usage = bool(
                    chat_request.stream_options and chat_request.stream_options.include_usage
                )
                return await gw.stream(request, include_usage, t0)
            outcome = await gw.answer(request)
            if outcome.response.error is not None:
                raise reply_error(outcome.response)
        except HttpError as exc:
            gw.metrics.observe_error(exc.status, exc.code)
            log.info("refused", extra={"status": exc.status, "code": exc.code, "reason": str(exc)})
            return error_response(exc)
        response = outcome.response
        overhead = max(0.0, time.perf_counter() - t0 - outcome.pipeline_s)
        gw.metrics.observe_ok(outcome.pipeline_s, overhead, response.cached)
        headers = {
            "x-request-id": response.request_id,
            "x-kllm-pipeline-ms": f"{outcome.pipeline_s * 1000:.3f}",
            "x-kllm-gateway-ms": f"{overhead * 1000:.3f}",
        }
        log.info("answered", extra={"request_id": response.request_id, "cached": response.cached})
        created = int(time.time())
        if chat_request.stream:  # a replay of a streamed request: the answer in one piece
            usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
            return StreamingResponse(
                replayed(response, created, usage), headers=headers, media_type="text/event-stream"
            )
        body = orjson.dumps(api.completion(response, created))
        return HttpResponse(body, 200, headers, "application/json")

    async def feedback(http: HttpRequest) -> HttpResponse:
        try:
            tenant = gw.tenant(http)
            raw = await http.body()
            try:
                body = api.parse_feedback(orjson.loads(raw))
            except (orjson.JSONDecodeError, PipelineError) as exc:
                error = HttpError(400, "invalid_request", str(exc))
                gw.dead_letter(tenant, raw, error)
                raise error from exc
            message = Feedback(tenant=tenant, **body.model_dump())
            await gw.publish(FEEDBACK.name, message.request_id, encode(message))
        except HttpError as exc:
            gw.metrics.observe_error(exc.status, exc.code)
            return error_response(exc)
        log.info("feedback", extra={"request_id": message.request_id, "rating": message.rating})
        accepted = {"status": "accepted", "request_id": message.request_id}
        return HttpResponse(orjson.dumps(accepted), 202, None, "application/json")

    async def models(http: HttpRequest) -> HttpResponse:
        try:
            gw.tenant(http)
        except HttpError as exc:
            return error_response(exc)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "kllm"}
            for m in gw.settings.gateway_models
        ]
        return HttpResponse(
            orjson.dumps({"object": "list", "data": data}), 200, None, "application/json"
        )

    async def dashboard(_http: HttpRequest) -> HttpResponse:
        gw.monitor().start()
        return HttpResponse(PAGE, 200, None, "text/html; charset=utf-8")

    async def dashboard_data(_http: HttpRequest) -> HttpResponse:
        data = gw.monitor().data()
        data["gateway"] = {"waiting": len(gw.waiting), "streams": gw.streams}
        return HttpResponse(orjson.dumps(data), 200, None, "application/json")

    async def health(_http: HttpRequest) -> HttpResponse:
        ok = gw.router.alive
        body = {"status": "ok" if ok else "reply router stopped", "waiting": len(gw.waiting)}
        return HttpResponse(orjson.dumps(body), 200 if ok else 503, None, "application/json")

    async def metrics(_http: HttpRequest) -> HttpResponse:
        gw.metrics.waiting.set(len(gw.waiting))
        body, content_type = gw.metrics.render()
        return HttpResponse(body, 200, None, content_type)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()
        poller = threading.Thread(target=_poll_producer, args=(gw.producer, stop), daemon=True)
        poller.start()
        gw.router.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            stop.set()
            gw.router.close()
            if gw._monitor is not None:
                gw._monitor.close()
            gw.producer.flush(5)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/dashboard/data", dashboard_data, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _poll_producer(producer: Producer, stop: threading.Event) -> None:
    """Delivery callbacks run from poll(); this thread keeps them flowing."""
    while not stop.is_set():
        producer.poll(0.05)


def build(settings: Settings) -> Gateway:
    bootstrap = settings.bootstrap()
    producer = make_producer(bootstrap, settings.producer_config())
    fetch = {"fetch.wait.max.ms": settings.fetch_wait_max_ms}
    # Moderated windows only: the raw token topic never reaches a caller.
    router = ReplyRouter(bootstrap, [RESPONSES, MODERATED_TOKENS], fetch)
    return Gateway(settings, KeyStore(settings.keys_path()), producer, router)


def listening_socket(settings: Settings) -> socket.socket:
    """SO_REUSEPORT: several gateway replicas on one host share the port, and the
    kernel spreads connections across them."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says it is TCP; without it every response waited ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings.gateway_host, settings.gateway_port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"gateway cannot listen on {settings.gateway_host}:{settings.gateway_port}: {exc} "
            "(set KLLM_GATEWAY_PORT)"
        ) from exc
    sock.listen(1024)
    return sock


async def serve(settings: Settings, gw: Gateway) -> None:
    import uvicorn

    config = uvicorn.Config(
        make_app(gw),
        host=settings.gateway_host,
        port=settings.gateway_port,
        timeout_keep_alive=settings.gateway_keep_alive_s,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listening_socket(settings)]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        from kllm.runtime.ready import mark_ready

        mark_ready(settings.ready_file)
        log.info("gateway listening", extra={"port": settings.gateway_port, "stage": STAGE})
    await task


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure("gateway", settings.trace_export, settings.run_dir)
    asyncio.run(serve(settings, build(settings)))


if __name__ == "__main__":
    main()
