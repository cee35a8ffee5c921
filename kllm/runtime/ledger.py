"""What a stage already published before a replay: dead-lettering once per offset, and
answering once per request.

A stage replays what it had not committed when it crashed, when its partition moved to
a peer, or when the broker restarted. Its outputs for those records were often already
acknowledged. Two of them must not be published twice:
- a DLQ record: a bad record would be dead-lettered once per replay;
- an answer on the responses topic: subscribers would read a request answered twice.

The memory of both is the topic itself, not a local note: before publishing, the stage
reads what was appended since it last looked (any process's records, a crashed peer's
included) and skips what is already there. An output that was never acknowledged is
therefore never remembered as sent. A ledger is best effort in one direction only: when
it cannot read the topic in time, the stage publishes (a duplicate, never a loss).

A stage process installs both when it starts (``install_for``); without them nothing
is deduplicated (unit tests, tools).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from schemas import peek_request_id
from topics import ANSWER_LEDGER_GROUP, DLQ_LEDGER_GROUP, RESPONSES, TopicSpec

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
K_co = TypeVar("K_co", bound=Hashable, covariant=True)

SourceRef = tuple[str, int, int]
"""(source topic, partition, offset) of a dead-lettered record."""


class PublishedLog(Protocol[K_co]):
    """A topic as a ledger reads it: the keys of what was appended."""

    def read_new(self) -> Iterable[K_co]:
        """The keys of records appended since the last call (the first call: of the
        newest ones)."""
        ...


class Ledger(Generic[K]):
    """Remembers the keys of published records, learning them from their topic.

    ``refresh_s``: how old what it knows may be before a check reads the topic again; a
    peer's records reach the ledger at most that late after a partition moves, and a
    partition moves only after the peer's session timed out, seconds later.
    ``max_remembered``: keys kept, the newest first; a replay only repeats the last few
    seconds of a partition."""

    def __init__(
        self,
        source: PublishedLog[K],
        refresh_s: float = 1.0,
        max_remembered: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.max_remembered = max_remembered
        self.clock = clock
        self._seen: OrderedDict[K, None] = OrderedDict()
        self._read_at: float | None = None

    def seen(self, key: K) -> bool:
        """True when a record with this key is on the topic already."""
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._learn(self.source.read_new())
            self._read_at = now
        return key in self._seen

    def _learn(self, keys: Iterable[K]) -> None:
        for key in keys:
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self.max_remembered:
            self._seen.popitem(last=False)


class DeadLetterLedger(Ledger[SourceRef]):
    """The source offsets that have their DLQ record."""

    def already_lettered(self, topic: str, partition: int, offset: int) -> bool:
        """True when this source offset has a DLQ record already."""
        if offset < 0:
            return False  # not from a topic (the gateway's refusals): nothing to replay
        return self.seen((topic, partition, offset))


class AnswerLedger(Ledger[str]):
    """The request ids that have their answer on the responses topic, or that this
    process answered in its current run.

    Replays upstream (a stage before this one replayed, and its output went out twice)
    bring the same request here twice within milliseconds, before the first answer can
    be read back; so the answers this process produced are noted too. A note is safe
    only while no output of the run has failed: the runner calls ``forget_noted()``
    whenever it starts a run, since a run whose output failed ends without committing."""

    def __init__(
        self,
        source: PublishedLog[str],
        refresh_s: float = 1.0,
        max_remembered: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(source, refresh_s, max_remembered, clock)
        self._noted: OrderedDict[str, None] = OrderedDict()

    def already_answered(self, request_id: str) -> bool:
        return request_id in self._noted or self.seen(request_id)

    def note(self, request_id: str) -> None:
        """This process is publishing the answer to ``request_id`` in its current run."""
        self._noted[request_id] = None
        while len(self._noted) > self.max_remembered:
            self._noted.popitem(last=False)

    def forget_noted(self) -> None:
        self._noted.clear()


class KafkaPublishedLog(Generic[K]):
    """Reads topics without a consumer group: from their last ``tail`` records on the
    first call, then what is new; ``key_of`` names a record (None: not one to remember).

    A read goes on until every partition is past the high watermark the broker reports
    (asked afresh each time, at most ``catch_up_s``), then until a poll comes back empty.
    Some brokers report a watermark below the true end (Tansu: the last batch's base
    offset + 1), never above it, so the empty poll takes the rest. Between reads the
    partitions are paused: an idle stage sends the broker no fetches for its ledger."""

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[TopicSpec],
        key_of: Callable[[bytes | None], K | None],
        *,
        group: str,
        tail: int = 5_000,
        fetch_wait_ms: int = 10,
        catch_up_s: float = 2.0,
    ) -> None:
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": group,  # required by librdkafka; never joins or commits
            "enable.auto.commit": False,
            "fetch.wait.max.ms": fetch_wait_ms,
        }
        self._topics = [t.name for t in topics]
        self._key_of = key_of
        self._tail = tail
        self._catch_up_s = catch_up_s
        self._consumer: Consumer | None = None
        self._next: dict[tuple[str, int], int] = {}  # the offset each partition reads next

    def _assign(self) -> Consumer:
        consumer = Consumer(self._config)  # made on first use: a stage that never checks
        start: list[TopicPartition] = []  # pays for no connection
        try:
            for name in self._topics:
                meta = consumer.list_topics(name, timeout=10).topics[name]
                for p in meta.partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                    begin = max(low, high - self._tail) if high > 0 else OFFSET_BEGINNING
                    start.append(TopicPartition(name, p, begin))
                    self._next[(name, p)] = max(begin, low, 0)
        except KafkaException as exc:
            consumer.close()
            raise BrokerError(f"cannot read {self._topics}: {exc}") from exc
        consumer.assign(start)
        self._consumer = consumer
        return consumer

    def read_new(self) -> Iterable[K]:
        consumer = self._consumer
        if consumer is None:
            consumer = self._assign()
        else:
            consumer.resume(self._partitions())
        found: list[K] = []
        deadline = time.monotonic() + self._catch_up_s
        behind = self._behind(consumer)
        try:
            while True:
                batch = consumer.consume(500, timeout=0.05)
                for msg in batch:
                    if msg.error() is not None:
                        continue
                    where = (msg.topic() or "", msg.partition() or 0)
                    self._next[where] = max(self._next.get(where, 0), (msg.offset() or 0) + 1)
                    if (key := self._key_of(msg.value())) is not None:
                        found.append(key)
                if batch:
                    continue
                if not behind or time.monotonic() >= deadline:
                    break
                behind = self._behind(consumer)
        finally:
            consumer.pause(self._partitions())
        return found

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._next]

    def _behind(self, consumer: Consumer) -> bool:
        """True while a partition has records below its reported watermark left to read.
        A broker that does not answer counts as caught up: the ledger must not hold the
        stage back (it then publishes, at worst a duplicate)."""
        for (topic, p), nxt in self._next.items():
            try:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=1)
            except KafkaException as exc:
                log.warning("ledger cannot ask the watermark", extra={"error": str(exc)})
                return False
            if nxt < high:
                return True
        return False

    def close(self) -> None:
        if self._consumer is not None:
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
_answers: AnswerLedger | None = None


def install(ledger: DeadLetterLedger | None) -> None:
    """The ledger this process dead-letters through (None: none)."""
    global _installed
    _installed = ledger


def installed() -> DeadLetterLedger | None:
    return _installed


def install_answers(ledger: AnswerLedger | None) -> None:
    """The ledger this process answers through (None: none)."""
    global _answers
    _answers = ledger


def installed_answers() -> AnswerLedger | None:
    return _answers


def for_sources(
    bootstrap: str, sources: Iterable[TopicSpec], fetch_wait_ms: int = 10
) -> DeadLetterLedger | None:
    """A ledger over the DLQs of ``sources`` (None when none of them has one); its reader
    waits ``fetch_wait_ms`` per fetch (the stage's own setting)."""
    dlqs = [s.dlq for s in sources if s.has_dlq]
    if not dlqs:
        return None
    log.info("dead-letter ledger", extra={"dlqs": [d.name for d in dlqs]})
    reader = KafkaPublishedLog(
        bootstrap, dlqs, _source_of, group=DLQ_LEDGER_GROUP, fetch_wait_ms=fetch_wait_ms
    )
    return DeadLetterLedger(reader)


def for_answers(bootstrap: str, fetch_wait_ms: int = 10) -> AnswerLedger:
    """A ledger over the responses topic, by request id."""
    reader = KafkaPublishedLog(
        bootstrap,
        [RESPONSES],
        peek_request_id,
        group=ANSWER_LEDGER_GROUP,
        fetch_wait_ms=fetch_wait_ms,
    )
    return AnswerLedger(reader)


def install_for(bootstrap: str, owned: Iterable[TopicSpec], fetch_wait_ms: int = 10) -> None:
    """A stage's ledgers: over the DLQs of the topics it owns, and over the answers."""
    install(for_sources(bootstrap, owned, fetch_wait_ms))
    install_answers(for_answers(bootstrap, fetch_wait_ms))
