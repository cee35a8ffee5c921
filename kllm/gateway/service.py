"""The gateway between HTTP callers and the request topic: admission, publishing with
the broker's acknowledgement, waiting for the reply by request id, streams, and the
replay cache for callers repeating an Idempotency-Key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from confluent_kafka import KafkaException, Producer
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse

from kllm.core.errors import BrokerError
from kllm.gateway.config import STAGE, GatewayConfig
from kllm.gateway.http import HttpError, reply_error
from kllm.gateway.keys import KeyStore
from kllm.gateway.live import LiveStream
from kllm.gateway.monitor import PipelineMonitor
from kllm.gateway.replies import Reply, ReplyRouter
from kllm.runtime import tracing
from kllm.runtime.delivery import produce_acked_async
from kllm.runtime.metrics import GatewayMetrics
from schemas import DeadLetter, Request, Response, encode
from topics import REQUESTS, RESPONSES

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    response: Response
    pipeline_s: float


@dataclass
class Gateway:
    config: GatewayConfig
    keys: KeyStore
    producer: Producer
    router: ReplyRouter
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    waiting: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    replays: OrderedDict[str, tuple[float, Outcome]] = field(default_factory=OrderedDict)
    streams: int = 0
    _monitor: PipelineMonitor | None = None
    _stop_polling: threading.Event = field(default_factory=threading.Event)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Delivery callbacks run from the producer's poll(): a thread keeps them flowing."""
        self._stop_polling = threading.Event()
        poller = threading.Thread(
            target=_poll_producer, args=(self.producer, self._stop_polling), daemon=True
        )
        poller.start()
        self.router.start(loop)

    def close(self) -> None:
        self._stop_polling.set()
        self.router.close()
        if self._monitor is not None:
            self._monitor.close()
        self.producer.flush(5)

    def monitor(self) -> PipelineMonitor:
        """Started on the first dashboard visit: until then no replica tails every topic."""
        if self._monitor is None:
            self._monitor = PipelineMonitor(self.config.bootstrap, self.config.pools)
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
            payload_b64=base64.b64encode(raw[: self.config.max_body_bytes]).decode(),
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
        if busy >= self.config.max_waiting:
            self.metrics.shed.inc()
            raise HttpError(
                429,
                "overloaded",
                f"{busy} requests are already waiting here; retry shortly",
                retry_after=self.config.retry_after_s,
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
        try:
            # The caller's span goes with it: the trace goes on in Kafka.
            await produce_acked_async(
                self.producer, (topic, key, value), tracing.headers_for(), polled_elsewhere=True
            )
        except (BufferError, KafkaException, BrokerError) as exc:
            raise HttpError(503, "unavailable", f"cannot publish the request: {exc}") from exc

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
        if not rid.startswith("idem-") or self.config.replay_ttl_s <= 0:
            return
        now = time.monotonic()
        self.replays[rid] = (now + self.config.replay_ttl_s, outcome)
        while self.replays and next(iter(self.replays.values()))[0] <= now:
            self.replays.popitem(last=False)


def _poll_producer(producer: Producer, stop: threading.Event) -> None:
    while not stop.is_set():
        producer.poll(0.05)
