"""The gateway between HTTP callers and the request topic: admission, publishing with
the broker's acknowledgement within a deadline, waiting for the reply by request id,
streams (released when their caller leaves), and the recent answers for callers
repeating an Idempotency-Key on any replica."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from confluent_kafka import KafkaException, Producer
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse

from kllm.core.errors import BrokerError
from kllm.gateway.config import STAGE, GatewayConfig
from kllm.gateway.health import Health, Probe
from kllm.gateway.http import HttpError, ReleasingStream, reply_error
from kllm.gateway.keys import KeyStore
from kllm.gateway.live import LiveStream
from kllm.gateway.monitor import PipelineMonitor
from kllm.gateway.recent import RecentAnswers
from kllm.gateway.replies import Reply, ReplyRouter
from kllm.runtime import tracing
from kllm.runtime.delivery import produce_acked_async
from kllm.runtime.metrics import GatewayMetrics
from processors import openai_api as api
from processors.admission import idempotent_id
from schemas import DeadLetter, EmbeddingRequest, Embeddings, Request, Response, encode
from topics import EMBEDDING_REQUESTS, REQUESTS, RESPONSES

T = TypeVar("T")
Gone = Callable[[], Awaitable[None]]
"""Returns once the caller has closed its connection."""

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
    recent: RecentAnswers | None = None
    """Shared with the router, which fills it; by default the router's, or a new one."""
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    waiting: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    """Round trips in progress, by request id (each holds one slot)."""
    _callers: dict[str, int] = field(default_factory=dict)
    """Callers awaiting each round trip."""
    streams: int = 0
    embedding: int = 0
    """Embedding requests waiting for their vectors (each holds one slot)."""
    health: Health | None = None
    _monitor: PipelineMonitor | None = None
    _stop_polling: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.recent is None:
            self.recent = getattr(self.router, "recent", None) or RecentAnswers(
                self.config.replay_ttl_s
            )

    @property
    def answers(self) -> RecentAnswers:
        assert self.recent is not None
        return self.recent

    @property
    def busy(self) -> int:
        """Callers holding a slot here: waiting for an answer or vectors, or streaming."""
        return len(self.waiting) + self.streams + self.embedding

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Delivery callbacks run from the producer's poll(): a thread keeps them flowing."""
        self._stop_polling = threading.Event()
        poller = threading.Thread(
            target=_poll_producer, args=(self.producer, self._stop_polling), daemon=True
        )
        poller.start()
        self.router.start(loop)
        if self.config.health_interval_s > 0:
            probes = {"producer": _reaches(self.producer), "replies": self.router.reachable}
            self.health = Health(probes, self.config.health_interval_s)
            self.health.start()

    def readiness(self) -> dict[str, object]:
        """What /healthz reports: ready only when the producer and the reply router both
        reach the broker (and the router runs)."""
        clients = self.health.status() if self.health is not None else {}
        producer = clients.get("producer", True)
        replies = self.router.alive and clients.get("replies", True)
        if not self.router.alive:
            status = "reply router stopped"
        elif not (producer and replies):
            status = "broker unreachable"
        else:
            status = "ok"
        return {
            "status": status,
            "ready": producer and replies,
            "producer": producer,
            "replies": replies,
            "waiting": self.busy,
            "streams": self.streams,
            "subscriptions": self.router.waiting(),
        }

    def close(self) -> None:
        self._stop_polling.set()
        if self.health is not None:
            self.health.close()
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

    def dead_letter(
        self, tenant: str, raw: bytes, exc: HttpError, route: str = "/v1/chat/completions"
    ) -> None:
        """A body refused here is kept on the request DLQ like any other refusal
        (fire and forget: the caller's answer does not wait for it)."""
        letter = DeadLetter(
            stage=STAGE,
            reason=f"HTTP {exc.status} {exc.code}: {exc}",
            source_topic=f"http:{route}",
            partition=-1,
            offset=-1,
            key=tenant,
            payload_b64=base64.b64encode(raw[: self.config.max_body_bytes]).decode(),
        )
        try:
            self.producer.produce(REQUESTS.dlq.name, key=tenant, value=encode(letter))
        except (BufferError, KafkaException) as err:
            log.warning("refusal not dead-lettered", extra={"reason": str(err)})

    def request_id(
        self, http: HttpRequest, tenant: str, chat_request: api.ChatCompletionRequest
    ) -> str:
        """A fresh id; with an Idempotency-Key, the one every replica derives from the
        tenant, the key and the body (the attempt after any that failed)."""
        key = http.headers.get("idempotency-key")
        if not key:
            return f"chatcmpl-{uuid.uuid4().hex}"
        return self.answers.attempt_id(idempotent_id(tenant, key, api.body_hash(chat_request)))

    async def answer(self, request: Request, gone: Gone | None = None) -> Outcome:
        """Publish once per request id; callers repeating it share the answer. The round
        trip is a task of its own: when every caller sharing it has left (``gone``), it
        is cancelled, and its slot and subscription are given back at once."""
        rid = request.request_id
        kept = self.answers.answer(rid)
        if kept is not None:
            return Outcome(kept, 0.0)
        trip = self.waiting.get(rid)
        if trip is None:
            self._admit()
            trip = asyncio.ensure_future(self._round_trip(request))
            self.waiting[rid] = trip
            trip.add_done_callback(partial(self._trip_done, rid))
        self._callers[rid] = self._callers.get(rid, 0) + 1
        try:
            if gone is None:
                return await asyncio.shield(trip)
            outcome = await _unless_gone(asyncio.shield(trip), gone)
        finally:
            self._callers[rid] -= 1
            if not self._callers[rid]:
                del self._callers[rid]
                if not trip.done():
                    trip.cancel()  # nobody is left to answer
                    self._forget(rid, trip)
        if outcome is None:
            log.info("caller left before the answer", extra={"request_id": rid})
            raise HttpError(499, "client_closed", "the caller closed the connection")
        return outcome

    def _forget(self, rid: str, trip: asyncio.Future[Outcome]) -> None:
        if self.waiting.get(rid) is trip:  # not a newer trip for the same id
            del self.waiting[rid]

    def _trip_done(self, rid: str, trip: asyncio.Future[Outcome]) -> None:
        self._forget(rid, trip)
        if not trip.cancelled() and trip.exception() is None:
            # The router has kept it too, unless the reply came before it started.
            self.answers.remember(trip.result().response)

    def fresh(self, rid: str) -> bool:
        """Neither waited for nor answered lately: a stream of its own, not a replay."""
        return rid not in self.waiting and self.answers.answer(rid) is None

    def _admit(self) -> None:
        busy = self.busy
        if busy >= self.config.max_waiting:
            self.metrics.shed.inc()
            raise HttpError(
                429,
                "overloaded",
                f"{busy} requests are already waiting here; retry shortly",
                retry_after=self.config.retry_after_s,
            )

    async def stream(
        self,
        request: Request,
        include_usage: bool,
        t0: float,
        gone: Gone,
        shape: api.Shape = api.as_is,
    ) -> HttpResponse:
        """Publish, wait for the first reply, then stream moderated windows as SSE. An
        error reply before any window is an HTTP error, as for a non-streamed call. The
        slot and the subscription are released however the stream ends: the caller
        leaving before the first reply, or before the stream was ever sent, included."""
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
            shape,
        )
        try:
            await self._publish(request)
            first = await _unless_gone(live.next_reply(), gone)
        except TimeoutError as exc:
            release()
            raise HttpError(504, "timeout", "no answer before the request's deadline") from exc
        except BaseException:
            release()
            raise
        if first is None:
            release()
            log.info("caller left before the first reply", extra={"request_id": rid})
            raise HttpError(499, "client_closed", "the caller closed the connection")
        if isinstance(first.message, Response) and first.message.error is not None:
            release()
            raise reply_error(first.message)
        first_s = first.received_at - t0
        cached = isinstance(first.message, Response) and first.message.cached
        self.metrics.observe_ok(first_s, 0.0, cached)
        headers = {"x-request-id": rid, "x-kllm-first-reply-ms": f"{first_s * 1000:.3f}"}
        log.info("streaming", extra={"request_id": rid})
        return ReleasingStream(
            live.events(first), release, headers=headers, media_type="text/event-stream"
        )

    async def embed(self, request: EmbeddingRequest, gone: Gone) -> Embeddings:
        """Publish an embedding request and wait for its vectors, holding a slot like any
        caller; the stage's error answer (on the responses) is the caller's HTTP error."""
        self._admit()
        rid = request.request_id
        queue = self.router.subscribe(rid)
        self.embedding += 1  # a slot, released however the wait ends
        try:
            key, value = rid, encode(request)
            await self.publish(EMBEDDING_REQUESTS.name, key, value, request.deadline_at)
            reply = await _unless_gone(self._embedded(queue, request.deadline_at), gone)
        finally:
            self.embedding -= 1
            self.router.unsubscribe(rid, queue)
        if reply is None:
            raise HttpError(499, "client_closed", "the caller closed the connection")
        if isinstance(reply.message, Response):
            raise reply_error(reply.message)
        assert isinstance(reply.message, Embeddings)
        return reply.message

    async def _embedded(self, queue: asyncio.Queue[Reply], deadline_at: float | None) -> Reply:
        left = (deadline_at or time.time()) - time.time() + 1.0
        try:
            while True:
                reply = await asyncio.wait_for(queue.get(), timeout=max(left, 0.01))
                if isinstance(reply.message, (Embeddings, Response)):
                    return reply
        except TimeoutError as exc:
            raise HttpError(504, "timeout", "no answer before the request's deadline") from exc

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
        await self.publish(REQUESTS.name, request.tenant, encode(request), request.deadline_at)

    async def publish(
        self, topic: str, key: str, value: bytes, deadline_at: float | None = None
    ) -> None:
        """Produce and wait for the broker's acknowledgement, at most the publish timeout
        and never past the request's deadline: 503 if it fails or does not come. (The
        producer's message.timeout.ms is the same timeout: it gives up on the record too.)"""
        wait = self.config.publish_timeout_s
        if deadline_at is not None:
            wait = min(wait, max(0.0, deadline_at - time.time()))
        try:
            # The caller's span goes with it: the trace goes on in Kafka.
            ack = produce_acked_async(
                self.producer, (topic, key, value), tracing.headers_for(), polled_elsewhere=True
            )
            await asyncio.wait_for(ack, timeout=wait)
        except TimeoutError as exc:
            log.warning("publish not acknowledged in time", extra={"topic": topic, "wait_s": wait})
            raise self._unavailable("the broker did not acknowledge the request in time") from exc
        except (BufferError, KafkaException, BrokerError) as exc:
            log.warning("publish failed", extra={"topic": topic, "reason": str(exc)})
            raise self._unavailable("the request could not be published") from exc

    def _unavailable(self, what: str) -> HttpError:
        retry = self.config.retry_after_s
        return HttpError(503, "unavailable", f"{what}; retry shortly", retry_after=retry)

    async def _reply(self, queue: asyncio.Queue[Reply], request: Request) -> Reply:
        left = (request.deadline_at or time.time()) - time.time() + 1.0
        try:
            while True:
                reply = await asyncio.wait_for(queue.get(), timeout=max(left, 0.01))
                if reply.topic == RESPONSES.name:
                    return reply
        except TimeoutError as exc:
            raise HttpError(504, "timeout", "no answer before the request's deadline") from exc


async def _unless_gone(main: Awaitable[T], gone: Gone) -> T | None:
    """``main``'s result, or None as soon as the caller has left (``main`` cancelled)."""
    task = asyncio.ensure_future(main)
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def _reaches(producer: Producer) -> Probe:
    def probe(timeout_s: float) -> bool:
        try:
            producer.list_topics(REQUESTS.name, timeout=timeout_s)
        except KafkaException:
            return False
        return True

    return probe


def _poll_producer(producer: Producer, stop: threading.Event) -> None:
    while not stop.is_set():
        producer.poll(0.05)
