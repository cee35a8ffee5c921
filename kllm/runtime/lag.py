"""Consumer lag per partition: a group's committed offset against the log end offset.

Both come from the standard APIs (committed offsets of the group, high
watermarks of the partitions), as any Kafka exposes them. A partition the group
never committed counts its whole retained log (end minus start) as lag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from kllm.core.errors import BrokerError
from topics import group_topics


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


def lag_groups(pools: Iterable[str] = ()) -> dict[str, tuple[str, ...]]:
    """The groups lag is read for by default: every declared one (topics.groups), with
    one inference group per configured pool."""
    return group_topics(pools)


def consumer_lag(
    bootstrap: str, groups: Mapping[str, Sequence[str]] | None = None, pools: Iterable[str] = ()
) -> list[Lag]:
    """Lag of ``groups`` (group -> topics it reads); default: :func:`lag_groups`."""
    out: list[Lag] = []
    for group, topics in (lag_groups(pools) if groups is None else groups).items():
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
