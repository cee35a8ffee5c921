"""A loop for a stateful stage whose state lives in a file, not in Kafka (the drift
detectors): several topics in one group, decoded batches handed to the processor.

Every ``every_s`` seconds, on a rebalance and on stop, in this order: the outputs are
acknowledged, the state is saved, then the offsets are committed. An offset never
passes unsaved state, so a restart resumes the state and replays only what came after.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from kllm.core.errors import BrokerError, PipelineError
from kllm.runtime.delivery import Acks, commit, next_offsets
from kllm.runtime.dispatch import dead_letter, ref_of
from kllm.runtime.kafka import records_only
from kllm.runtime.metrics import StageMetrics
from kllm.runtime.ports import Consumer, Producer, Record
from kllm.runtime.stop import StopFlag
from processors.base import Emit
from schemas import Message, decode
from topics import TopicSpec

log = logging.getLogger(__name__)

S = TypeVar("S")

Process = Callable[[list[Message], float], list[Emit]]
"""(messages, the time they were read) -> outputs."""


class CheckpointedRunner:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        sources: Sequence[TopicSpec],
        process: Process,
        save: Callable[[], None],
        *,
        stage: str,
        every_s: float = 5.0,
        metrics: StageMetrics | None = None,
    ) -> None:
        self.consumer = consumer
        self.sources = {s.name: s for s in sources}
        self.process = process
        self.save = save
        self.stage = stage
        self.every_s = every_s
        self.metrics = metrics
        self.producer = producer
        self.acks = Acks(producer)
        self.offsets: dict[tuple[str, int], int] = {}

    def run(self, stop: StopFlag, on_ready: Callable[[], None] | None = None) -> None:
        self.consumer.subscribe(list(self.sources), on_revoke=lambda _c, _p: self._revoked())
        if on_ready:
            on_ready()
        last = time.monotonic()
        try:
            while not stop.is_set():
                self.step()
                if time.monotonic() - last >= self.every_s:
                    self.persist()
                    last = time.monotonic()
            self.persist()
        finally:
            # Leave the group even after a failed persist: the restarted process gets
            # its partitions at once, not after the session timeout.
            self.consumer.close()

    def step(self, wait_s: float = 0.2) -> int:
        """Consume and process one batch; returns how many records it held."""
        records = records_only(self.consumer.consume(num_messages=256, timeout=wait_s))
        t0 = time.perf_counter()
        messages = [m for r in records if (m := self._decode(r)) is not None]
        outputs = self.process(messages, time.time())
        for emit in outputs:
            self.acks.produce(emit)
        self.producer.poll(0)  # serve delivery reports between checkpoints
        self.offsets.update(
            next_offsets((r.topic() or "", r.partition() or 0, r.offset() or 0) for r in records)
        )
        if self.metrics is not None:
            self.metrics.observe("inputs", len(records), outputs, time.perf_counter() - t0)
        return len(records)

    def persist(self) -> None:
        """Outputs acknowledged, state saved, then offsets: never an offset past unsaved
        state. Raises (and commits nothing) when an output was not acknowledged. A commit
        the group refuses (a rebalance, the broker away) is tried again at the next
        checkpoint: until then a restart replays events the saved state has seen, which
        is a replay, never a loss."""
        acks, self.acks = self.acks, Acks(self.producer)
        acks.wait(10.0)
        self.save()
        try:
            commit(self.consumer, self.offsets, asynchronous=False)
        except BrokerError as exc:
            log.warning("commit failed; retried at the next checkpoint", extra={"error": str(exc)})
            return
        self.offsets = {}

    def _revoked(self) -> None:
        """Partitions are leaving: checkpoint now. Offsets the group refuses are dropped,
        not kept for partitions this process may no longer own (their next owner replays
        from the last commit)."""
        self.persist()
        self.offsets = {}

    def _decode(self, record: Record) -> Message | None:
        source = self.sources[record.topic() or ""]
        ref = ref_of(source, record)
        value = record.value() or b""
        try:
            return decode(value, source.schema)  # type: ignore[arg-type]
        except PipelineError as exc:
            # A side reader: the topic's own stage dead-letters the record, not this one.
            dead_letter(self.stage, ref, value, f"{type(exc).__name__}: {exc}", owner=False)
            return None


class FileCheckpoint(Generic[S]):
    """State in one file, written whole: a crash mid-save leaves the old file intact."""

    def __init__(
        self, path: Path, dumps: Callable[[S], bytes], loads: Callable[[bytes, Path], S]
    ) -> None:
        self.path = path
        self._dumps = dumps
        self._loads = loads

    def load(self) -> S | None:
        """The saved state; None when there is none yet."""
        if not self.path.exists():
            return None
        return self._loads(self.path.read_bytes(), self.path)

    def save(self, state: S) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(self._dumps(state))
        os.replace(tmp, self.path)  # atomic: the old or the new checkpoint, never half
