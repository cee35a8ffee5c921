"""Which source records already have their DLQ record: dead-lettering once per offset.

A stage replays what it had not committed when it crashed, or when its partition moved
to a peer. A bad record among them was dead-lettered the first time; without a memory
of that it would be dead-lettered once per replay. The memory is the DLQ topic itself:
before dead-lettering, the stage reads what was appended to its DLQs since it last
looked (any process's records, a crashed peer's included) and skips a source offset
that is already there. Reading the topic, not a local note, means an output that was
never acknowledged is not remembered as sent.

A process installs one ledger when its runner starts (``install``); without one,
dead-lettering is not deduplicated (unit tests, tools).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from topics import DLQ_LEDGER_GROUP, TopicSpec

log = logging.getLogger(__name__)

SourceRef = tuple[str, int, int]
"""(source topic, partition, offset) of a dead-lettered record."""


class DeadLetterLog(Protocol):
    """The DLQ topics as the ledger reads them."""

    def read_new(self) -> Iterable[SourceRef]:
        """The source records of DLQ records appended since the last call (the first
        call: of the newest ones)."""
        ...


class DeadLetterLedger:
    """Remembers dead-lettered source offsets, learning them from the DLQ topics.

    ``refresh_s``: how old what it knows may be before a check reads the DLQs again;
    a peer's records reach the ledger at most that late after a partition moves, and a
    partition moves only after the peer's session timed out, seconds later.
    ``max_remembered``: offsets kept, the newest first; a replay only repeats the last
    few seconds of a partition."""

    def __init__(
        self,
        source: DeadLetterLog,
        refresh_s: float = 1.0,
        max_remembered: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.max_remembered = max_remembered
        self.clock = clock
        self._seen: OrderedDict[SourceRef, None] = OrderedDict()
        self._read_at: float | None = None

    def already_lettered(self, topic: str, partition: int, offset: int) -> bool:
        """True when this source offset has a DLQ record already."""
        if offset < 0:
            return False  # not from a topic (the gateway's refusals): nothing to replay
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._learn(self.source.read_new())
            self._read_at = now
        return (topic, partition, offset) in self._seen

    def _learn(self, refs: Iterable[SourceRef]) -> None:
        for ref in refs:
            self._seen[ref] = None
            self._seen.move_to_end(ref)
        while len(self._seen) > self.max_remembered:
            self._seen.popitem(last=False)


class KafkaDeadLetterLog:
    """Reads DLQ topics without a consumer group: from their last ``tail`` records on
    the first call, then what is new. It reads until a poll comes back empty rather
    than up to the high watermark, which some brokers report wrong."""

    def __init__(
        self,
        bootstrap: str,
        dlqs: Sequence[TopicSpec],
        tail: int = 5_000,
        fetch_wait_ms: int = 10,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": DLQ_LEDGER_GROUP,  # required by librdkafka; never commits
                "enable.auto.commit": False,
                "fetch.wait.max.ms": fetch_wait_ms,
            }
        )
        self._dlqs = [t.name for t in dlqs]
        self._tail = tail
        self._assigned = False

    def _assign(self) -> None:
        start: list[TopicPartition] = []
        try:
            for name in self._dlqs:
                meta = self._consumer.list_topics(name, timeout=10).topics[name]
                for p in meta.partitions:
                    low, high = self._consumer.get_watermark_offsets(
                        TopicPartition(name, p), timeout=10
                    )
                    begin = max(low, high - self._tail) if high > 0 else OFFSET_BEGINNING
                    start.append(TopicPartition(name, p, begin))
        except KafkaException as exc:
            raise BrokerError(f"cannot read the DLQs {self._dlqs}: {exc}") from exc
        self._consumer.assign(start)
        self._assigned = True

    def read_new(self) -> Iterable[SourceRef]:
        if not self._assigned:
            self._assign()
        found: list[SourceRef] = []
        while batch := self._consumer.consume(500, timeout=0.05):
            for msg in batch:
                if msg.error() is None and (ref := _source_of(msg.value())) is not None:
                    found.append(ref)
        return found

    def close(self) -> None:
        self._consumer.close()


def _source_of(value: bytes | None) -> SourceRef | None:
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    topic, partition, offset = body.get("source_topic"), body.get("partition"), body.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return (topic, partition, offset)
    return None


_installed: DeadLetterLedger | None = None


def install(ledger: DeadLetterLedger | None) -> None:
    """The ledger this process dead-letters through (None: none)."""
    global _installed
    _installed = ledger


def installed() -> DeadLetterLedger | None:
    return _installed


def for_sources(
    bootstrap: str, sources: Iterable[TopicSpec], fetch_wait_ms: int = 10
) -> DeadLetterLedger | None:
    """A ledger over the DLQs of ``sources`` (None when none of them has one); its reader
    waits ``fetch_wait_ms`` per fetch (the stage's own setting)."""
    dlqs = [s.dlq for s in sources if s.has_dlq]
    if not dlqs:
        return None
    log.info("dead-letter ledger", extra={"dlqs": [d.name for d in dlqs]})
    return DeadLetterLedger(KafkaDeadLetterLog(bootstrap, dlqs, fetch_wait_ms=fetch_wait_ms))
