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
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

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
    process answered moments ago.

    Replays upstream (a stage before this one replayed, and its output went out twice)
    bring the same request here twice within milliseconds, before the first answer can
    be read back; so the answers this process gives are noted too. A note stands for
    ``note_trust_s`` only: by then an answer that was written is on the topic, and the
    topic is the memory. An answer that is not there by then was lost with its broker
    (measured on the embedded broker: an answer acknowledged just before a kill -9 was
    not on the topic after its restart, and a note trusted for good turned the replay's
    answer into a lost request). Past the window the stage answers again: a duplicate
    when the topic read lags, never a loss."""

    def __init__(
        self,
        source: PublishedLog[str],
        refresh_s: float = 1.0,
        max_remembered: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        note_trust_s: float = 5.0,
    ) -> None:
        super().__init__(source, refresh_s, max_remembered, clock)
        self.note_trust_s = note_trust_s
        self._noted: OrderedDict[str, float] = OrderedDict()

    def already_answered(self, request_id: str) -> bool:
        noted_at = self._noted.get(request_id)
        if noted_at is not None and self.clock() - noted_at < self.note_trust_s:
            return True
        return self.seen(request_id)

    def note(self, request_id: str) -> None:
        """This process is publishing the answer to ``request_id`` now."""
        self._noted[request_id] = self.clock()
        self._noted.move_to_end(request_id)
        while len(self._noted) > self.max_remembered:
            self._noted.popitem(last=False)


class KafkaPublishedLog(Generic[K]):
    """Reads topics without a consumer group: from their last ``tail`` records on the
    first call, then what is new; ``key_of`` names a record (None: not one to remember).

    A catch-up read goes on until every partition is past the high watermark the broker
    reported when it began (for at most ``catch_up_s``), then takes what is already
    fetched. Some brokers report a watermark below the true end (Tansu: the last batch's
    base offset + 1), never above it; the rest of that batch came in the same fetch.

    Two ways to go on after the first read:
    - on demand (``follow`` False): each call catches up again, and the partitions are
      paused between calls, so an idle stage sends the broker no fetches. A call costs
      tens of milliseconds: for checks that are rare (dead-lettering).
    - following: a thread keeps reading, and a call takes what arrived, at no cost to
      the caller: for a check on every record (answers). Its fetches wait
      ``fetch_wait_ms``; what the topic holds reaches the ledger at most that late."""

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
        follow: bool = False,
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
        self._follow = follow
        self._consumer: Consumer | None = None
        self._next: dict[tuple[str, int], int] = {}  # the offset each partition reads next
        self._arrived: deque[K] = deque()  # what the following thread read
        self._closed = threading.Event()

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
        if consumer is not None and self._follow:
            return [self._arrived.popleft() for _ in range(len(self._arrived))]
        if consumer is None:
            consumer = self._assign()
        else:
            consumer.resume(self._partitions())
        found = self._catch_up(consumer)
        if self._follow:
            threading.Thread(target=self._keep_reading, args=(consumer,), daemon=True).start()
        else:
            consumer.pause(self._partitions())
        return found

    def _catch_up(self, consumer: Consumer) -> list[K]:
        found: list[K] = []
        ends = self._ends(consumer)
        deadline = time.monotonic() + self._catch_up_s
        while True:
            behind = any(self._next[tp] < end for tp, end in ends.items())
            # consume() waits its whole timeout unless it fills the batch: wait only while
            # records are known to be missing, and then briefly.
            batch = consumer.consume(500, timeout=0.01 if behind else 0)
            found.extend(self._take(batch))
            if not batch and (not behind or time.monotonic() >= deadline):
                return found

    def _keep_reading(self, consumer: Consumer) -> None:
        try:
            while not self._closed.is_set():
                try:
                    self._arrived.extend(self._take(consumer.consume(500, timeout=0.25)))
                except KafkaException as exc:  # librdkafka reconnects by itself; go on
                    log.warning("ledger read failed", extra={"error": str(exc)})
                    time.sleep(0.5)
        finally:
            consumer.close()

    def _take(self, batch: Sequence[Message]) -> list[K]:
        found: list[K] = []
        for msg in batch:
            if msg.error() is not None:
                continue
            where = (msg.topic() or "", msg.partition() or 0)
            self._next[where] = max(self._next.get(where, 0), (msg.offset() or 0) + 1)
            if (key := self._key_of(msg.value())) is not None:
                found.append(key)
        return found

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._next]

    def _ends(self, consumer: Consumer) -> dict[tuple[str, int], int]:
        """Each partition's high watermark as the broker reports it now. A broker that
        does not answer gives none: the ledger must not hold the stage back (it then
        publishes, at worst a duplicate)."""
        ends: dict[tuple[str, int], int] = {}
        for topic, p in self._next:
            try:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=1)
            except KafkaException as exc:
                log.warning("ledger cannot ask the watermark", extra={"error": str(exc)})
                return {}
            ends[(topic, p)] = high
        return ends

    def close(self) -> None:
        self._closed.set()
        if self._consumer is not None and not self._follow:
            self._consumer.close()  # a following reader's thread owns it until exit


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


ANSWERS_FETCH_WAIT_MS = 100
"""The answer ledger's fetches: a replay comes seconds after the answer it repeats (a
session timeout, a restart), and a process's own answers are noted at once."""


def for_answers(bootstrap: str, fetch_wait_ms: int = ANSWERS_FETCH_WAIT_MS) -> AnswerLedger:
    """A ledger over the responses topic, by request id, following it."""
    reader = KafkaPublishedLog(
        bootstrap,
        [RESPONSES],
        peek_request_id,
        group=ANSWER_LEDGER_GROUP,
        fetch_wait_ms=fetch_wait_ms,
        follow=True,
    )
    return AnswerLedger(reader)


def install_for(bootstrap: str, owned: Iterable[TopicSpec], fetch_wait_ms: int = 10) -> None:
    """A stage's ledgers: over the DLQs of the topics it owns, and over the answers."""
    install(for_sources(bootstrap, owned, fetch_wait_ms))
    install_answers(for_answers(bootstrap))
