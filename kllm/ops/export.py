"""The enriched feedback stream as a dataset: JSONL (chat-format rows, ready for
fine-tuning or evaluation) or Parquet (one flat column per field). ``read_topic`` is
the snapshot reader under it, for any topic (`kllm replay`, `kllm shadow report`).

Reads llm.feedback.enriched from its start to the end it had when the export
began, without a consumer group (an export is a snapshot, not a subscriber),
keeps the latest rating per request, and applies the filters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from kllm.core.errors import BrokerError, ConfigError
from kllm.core.refs import where
from schemas import FeedbackEnriched, Message, SchemaError, decode
from topics import EXPORT_GROUP, FEEDBACK_ENRICHED

M = TypeVar("M", bound=Message)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float | None = None) -> float:
    """An ISO 8601 date/time, or an age like 30m, 24h, 7d: a Unix time."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError as exc:
        raise ConfigError(f"{text!r} is neither an ISO date/time nor an age like 7d") from exc


@dataclass(frozen=True)
class Filter:
    tenant: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    min_rating: int = 1
    max_rating: int = 5
    orphans: bool = False

    def matches(self, r: FeedbackEnriched) -> bool:
        return (
            (self.orphans or r.status == "joined")
            and (self.tenant is None or r.tenant == self.tenant)
            and (self.model is None or r.model == self.model)
            and (self.since is None or r.feedback_at >= self.since)
            and (self.until is None or r.feedback_at < self.until)
            and self.min_rating <= r.rating <= self.max_rating
        )


def latest_per_request(records: Iterator[FeedbackEnriched]) -> list[FeedbackEnriched]:
    latest: dict[str, FeedbackEnriched] = {}
    for r in records:
        kept = latest.get(r.request_id)
        if kept is None or r.feedback_at >= kept.feedback_at:
            latest[r.request_id] = r
    return sorted(latest.values(), key=lambda r: r.feedback_at)


def chat_row(r: FeedbackEnriched) -> dict[str, Any]:
    """One JSONL line: the whole conversation and the answer as chat messages (ready to
    fine-tune on), the rating, and where it came from."""
    meta = r.model_dump(
        exclude={"prompt", "messages", "answer", "tool_calls", "rating", "label", "comment"}
    )
    return {
        "messages": [*_turns(r), _answer(r)],
        "rating": r.rating,
        "label": r.label,
        "comment": r.comment,
        "metadata": meta,
    }


def _turns(r: FeedbackEnriched) -> list[dict[str, Any]]:
    if not r.messages:  # joined before conversations travelled: the question alone
        return [{"role": "user", "content": r.prompt or ""}]
    return [m.wire() for m in r.messages]


def _answer(r: FeedbackEnriched) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": r.answer or ""}
    if r.tool_calls:
        turn["tool_calls"] = [c.model_dump(mode="json") for c in r.tool_calls]
    return turn


def flat_row(r: FeedbackEnriched) -> dict[str, Any]:
    row = r.model_dump(exclude={"usage", "messages", "tool_calls"})
    # One column each, as JSON text: a table's columns keep one type whatever the turns.
    row["messages"] = orjson.dumps([m.wire() for m in r.messages]).decode()
    row["tool_calls"] = orjson.dumps([c.model_dump(mode="json") for c in r.tool_calls]).decode()
    usage = r.usage
    row["prompt_tokens"] = usage.prompt_tokens if usage else None
    row["completion_tokens"] = usage.completion_tokens if usage else None
    return row


def write(records: list[FeedbackEnriched], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("wb") as f:
            for r in records:
                f.write(orjson.dumps(chat_row(r)) + b"\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([flat_row(r) for r in records]) if records else pa.table({})
        pq.write_table(table, path)
    else:
        raise ConfigError(f"{path}: the file name must end in .jsonl or .parquet")


def read_enriched(
    bootstrap: str,
    on_progress: Callable[[int, int], None] | None = None,
    on_unreadable: Callable[[str], None] | None = None,
    idle_s: float = 10.0,
    settle_s: float = 1.0,
) -> Iterator[FeedbackEnriched]:
    """Every readable record of the enriched feedback (see ``read_topic``)."""
    return read_topic(
        bootstrap, FEEDBACK_ENRICHED.name, FeedbackEnriched, on_progress, on_unreadable,
        idle_s=idle_s, settle_s=settle_s,
    )  # fmt: skip


def read_topic(
    bootstrap: str,
    topic: str,
    schema: type[M],
    on_progress: Callable[[int, int], None] | None = None,
    on_unreadable: Callable[[str], None] | None = None,
    *,
    since: float | None = None,
    until: float | None = None,
    idle_s: float = 10.0,
    settle_s: float = 1.0,
) -> Iterator[M]:
    """Every readable record of ``topic`` from the start to the end offsets taken now,
    and any that follow within ``settle_s``, produced within [``since``, ``until``]
    (Unix times; by the record's timestamp); unreadable ones are reported to
    ``on_unreadable``. The whole retained topic is read: a broker's time index is not
    relied on (the embedded one's is not kept)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": EXPORT_GROUP, "enable.auto.commit": False}
    )
    try:
        ends = _ranges(consumer, topic)
        total = sum(max(0, high - low) for low, high in ends.values())
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in ends.items()])
        reached = {p for p, (lo, hi) in ends.items() if hi <= lo}
        done, last = 0, time.monotonic()
        while True:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                quiet = time.monotonic() - last
                # Past every reported end, keep reading until the topic is quiet: a broker
                # may report an end inside its last batch (the embedded one does).
                if (len(reached) == len(ends) and quiet >= settle_s) or quiet >= idle_s:
                    break
                continue
            last = time.monotonic()
            p, offset = msg.partition(), msg.offset()
            if p is None or offset is None:
                continue
            if offset + 1 >= ends[p][1]:
                reached.add(p)
            done += 1
            if on_progress:
                on_progress(done, max(total, done))
            produced = msg.timestamp()[1] / 1000
            if (since is not None and produced < since) or (until is not None and produced > until):
                continue
            try:
                record = decode(msg.value() or b"", schema)
            except SchemaError as exc:
                if on_unreadable:
                    on_unreadable(f"{where(topic, p, offset)}: {exc}")
                continue
            yield record
    finally:
        consumer.close()


def _ranges(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    try:
        meta = consumer.list_topics(topic, timeout=10.0).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10.0)
            for p in meta.partitions
        }
    except KafkaException as exc:
        raise BrokerError(f"cannot read the offsets of {topic}: {exc}") from exc
