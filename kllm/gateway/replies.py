"""Routes replies from Kafka to the asyncio tasks waiting for them, by request id.

Every gateway replica reads every partition of the reply topics from their end,
without a consumer group: a reply reaches whichever replica holds the caller's
connection, with no join delay and no offsets to commit (a caller whose replica
dies loses its connection anyway). The consumer runs in a thread; only replies
someone waits for cross into the event loop, and the responses to Idempotency-Key
requests are kept in the replica's recent answers (kllm.gateway.recent), whoever
waits for them. So that a replica that has just (re)started knows the answers given
before it did, it reads the last ``warm`` responses of each partition first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, TopicPartition

from kllm.core.errors import PipelineError
from kllm.core.refs import readable_key
from kllm.gateway.recent import RecentAnswers
from kllm.runtime.kafka import end_offsets
from schemas import Message, Response, decode
from topics import REPLIES_GROUP, TopicSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    topic: str
    message: Message
    received_at: float  # time.perf_counter() when the router read it


class ReplyRouter:
    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[TopicSpec],
        extra: Mapping[str, str | int | bool] | None = None,
        recent: RecentAnswers | None = None,
        warm: int = 0,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": REPLIES_GROUP,  # required by librdkafka; never joined
                "enable.auto.commit": False,
                # A warm start below what retention kept starts at what is left.
                "auto.offset.reset": "earliest",
                **(extra or {}),
            }
        )
        self._schemas = {t.name: t.schema for t in topics if t.schema is not None}
        self._answers = {n for n, schema in self._schemas.items() if schema is Response}
        self.recent = recent
        starts = []
        # Records below each partition's end at start are read for the recent answers
        # only: none of them answers anyone waiting here now.
        self._live_from: dict[tuple[str, int], int] = {}
        for t in topics:
            back = warm if recent is not None and t.name in self._answers else 0
            for tp in end_offsets(self._consumer, t.name):
                self._live_from[(tp.topic, tp.partition)] = tp.offset
                starts.append(TopicPartition(tp.topic, tp.partition, max(0, tp.offset - back)))
        self._consumer.assign(starts)
        self._waiters: dict[str, list[asyncio.Queue[Reply]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reply-router", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def subscribe(self, request_id: str) -> asyncio.Queue[Reply]:
        """Register before publishing, so no reply can arrive unseen."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        with self._lock:
            self._waiters.setdefault(request_id, []).append(queue)
        return queue

    def unsubscribe(self, request_id: str, queue: asyncio.Queue[Reply]) -> None:
        with self._lock:
            queues = self._waiters.get(request_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._waiters.pop(request_id, None)

    def waiting(self) -> int:
        """Request ids someone on this replica is subscribed to."""
        with self._lock:
            return len(self._waiters)

    def reachable(self, timeout_s: float) -> bool:
        """Whether the router runs and its consumer gets an answer from the broker."""
        if not self.alive:
            return False
        try:
            self._consumer.list_topics(next(iter(self._schemas)), timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            request_id = readable_key(msg.key()) or None
            topic = msg.topic() or ""
            with self._lock:
                queues = list(self._waiters.get(request_id or "", ()))
            if (msg.offset() or 0) < self._live_from.get((topic, msg.partition() or 0), 0):
                queues = []  # read back at start, for the recent answers
            keep = (
                self.recent is not None
                and topic in self._answers
                and (request_id or "").startswith("idem-")
            )
            if queues or keep:
                kind, ms = msg.timestamp()
                at = None if kind == TIMESTAMP_NOT_AVAILABLE else ms / 1000
                self._deliver(topic, msg.value() or b"", queues, at)
        self._consumer.close()

    def _deliver(
        self, topic: str, value: bytes, queues: list[asyncio.Queue[Reply]], at: float | None
    ) -> None:
        try:
            message = decode(value, self._schemas[topic])
        except PipelineError as exc:  # a bad reply must not stop everyone else's
            log.error("unreadable reply", extra={"topic": topic, "reason": str(exc)})
            return
        if self.recent is not None and isinstance(message, Response):
            self.recent.remember(message, at)
        reply = Reply(topic, message, time.perf_counter())
        assert self._loop is not None
        for queue in queues:
            self._loop.call_soon_threadsafe(queue.put_nowait, reply)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
