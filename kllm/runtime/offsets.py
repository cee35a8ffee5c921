"""Which offsets are safe to commit when records finish out of order.

Records of one partition start in offset order but finish in any order (many
requests are in flight). The committed offset of a partition may only move
past a record once it and every earlier record of that partition have had
their output produced: the lowest offset still in flight bounds the commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class PartitionOffsets:
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None
    """One past the highest offset started."""
    committed: int | None = None

    def committable(self) -> int | None:
        if self.next_offset is None:
            return None
        return min(self.pending) if self.pending else self.next_offset


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartitionKey, PartitionOffsets] = {}

    @property
    def in_flight(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())

    def start(self, tp: TopicPartitionKey, offset: int) -> None:
        part = self._parts.setdefault(tp, PartitionOffsets())
        if offset in part.pending:
            raise ValueError(f"offset {offset} of {tp} is already in flight")
        part.pending.add(offset)
        part.next_offset = max(part.next_offset or 0, offset + 1)

    def finish(self, tp: TopicPartitionKey, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None:
            part.pending.discard(offset)

    def to_commit(self, unchanged: bool = False) -> dict[TopicPartitionKey, int]:
        """Offsets to commit now (the next offset to read): where they advanced, or all
        with ``unchanged`` (a final commit that must not trust an earlier async one)."""
        out = {}
        for tp, part in self._parts.items():
            offset = part.committable()
            if offset is not None and (unchanged or offset != part.committed):
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TopicPartitionKey, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._parts:
                self._parts[tp].committed = offset

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Drop partitions this consumer no longer owns."""
        for tp in tps:
            self._parts.pop(tp, None)
