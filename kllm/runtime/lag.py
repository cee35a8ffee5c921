"""Consumer lag per partition: a group's committed offset against the log end offset.

Both come from the standard APIs (committed offsets of the group, high
watermarks of the partitions), as any Kafka exposes them. A partition the group
never committed counts its whole retained log (end minus start) as lag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from kllm.runtime.settings import group_id
from topics import (
    DOCUMENTS,
    FEEDBACK,
    FEEDBACK_ENRICHED,
    GENERATIONS,
    INFERENCE,
    REQUESTS,
    RESPONSES,
    RETRIEVAL,
    TOKENS,
)

# Which topics each stage's consumer group reads (see services/).
GROUP_TOPICS: dict[str, tuple[str, ...]] = {
    group_id(stage): tuple(t.name for t in topics)
    for stage, topics in (
        ("ingestion", (REQUESTS,)),
        ("retrieval", (RETRIEVAL,)),
        ("indexer", (DOCUMENTS,)),
        ("inference", (INFERENCE,)),
        ("moderation", (GENERATIONS, TOKENS)),
        ("feedback", (FEEDBACK, RETRIEVAL, INFERENCE, RESPONSES)),
        ("drift", (RETRIEVAL, INFERENCE, RESPONSES, FEEDBACK_ENRICHED)),
    )
}


@dataclass(frozen=True)
class Lag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    start: int  # the log start offset (older records were deleted by retention)
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.start if self.committed is None else self.committed))


def consumer_lag(bootstrap: str, groups: Mapping[str, Sequence[str]] = GROUP_TOPICS) -> list[Lag]:
    out: list[Lag] = []
    for group, topics in groups.items():
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
        )
        try:
            out.extend(_group_lag(consumer, group, topics))
        except KafkaException as exc:
            raise BrokerError(f"cannot read the offsets of {group}: {exc}") from exc
        finally:
            consumer.close()
    return out


def _group_lag(consumer: Consumer, group: str, topics: Sequence[str]) -> list[Lag]:
    parts = [
        TopicPartition(t, p)
        for t in topics
        for p in consumer.list_topics(t, timeout=5).topics[t].partitions
    ]
    committed = consumer.committed(parts, timeout=5)
    rows = []
    for tp in committed:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(tp.topic, tp.partition), timeout=5
        )
        offset = tp.offset if tp.offset >= 0 else None
        rows.append(Lag(group, tp.topic, tp.partition, offset, low, high))
    return rows
