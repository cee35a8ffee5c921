"""Retention for the durable embedded broker, which enforces none itself.

Tansu's s3 engine keeps each produced batch as one object,
``clusters/<cluster>/topics/<topic>/partitions/<p>/records/<base offset>.batch``, and
never deletes one (its DeleteRecords is unimplemented). The trimmer deletes, per
partition, the batches older than their topic's declared retention (topics/), always
keeping the newest: it marks the partition's end, which the broker reads from the
listing. Compacted topics (the state changelogs) and undeclared ones are left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from topics import INFERENCE, TopicSpec, declared, inference_topic

log = logging.getLogger(__name__)


def retention_ms(topic: str) -> int | None:
    """The declared retention of ``topic`` in ms; None: keep it all (compacted, or not
    a topic of ours)."""
    spec = next((s for s in declared() if s.name == topic), None) or _pool_topic(topic)
    if spec is None or spec.cleanup_policy != "delete" or spec.retention_ms < 0:
        return None
    return spec.retention_ms


def _pool_topic(topic: str) -> TopicSpec | None:
    base = INFERENCE.name + "."
    if not topic.startswith(base):
        return None
    pool, dlq = topic.removeprefix(base), False
    if pool.endswith(".dlq"):
        pool, dlq = pool.removesuffix(".dlq"), True
    try:
        spec = inference_topic(pool)
    except ValueError:
        return None
    return spec.dlq if dlq else spec


@dataclass
class TrimReport:
    deleted: int = 0
    deleted_bytes: int = 0
    kept_bytes: int = 0


class Trimmer:
    """Deletes the record batches past their retention under a bucket folder."""

    def __init__(
        self,
        bucket_dir: Path,
        *,
        cap_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``cap_s``: keep a batch at most this long whatever its topic declares (0: no
        cap)."""
        self.bucket_dir = bucket_dir
        self.cap_ms = int(cap_s * 1000)
        self.clock = clock

    def keep_ms(self, topic: str) -> int | None:
        declared_ms = retention_ms(topic)
        if declared_ms is None:
            return None
        return min(declared_ms, self.cap_ms) if self.cap_ms else declared_ms

    def trim(self) -> TrimReport:
        report = TrimReport()
        now_ms = self.clock() * 1000
        for topic_dir in self.bucket_dir.glob("clusters/*/topics/*"):
            keep = self.keep_ms(topic_dir.name)
            for records in topic_dir.glob("partitions/*/records"):
                self._trim_partition(records, None if keep is None else now_ms - keep, report)
        return report

    def _trim_partition(
        self, records: Path, older_than_ms: float | None, report: TrimReport
    ) -> None:
        batches = sorted(records.glob("*.batch"))  # zero-padded offsets: name order
        for i, batch in enumerate(batches):
            try:
                stat = batch.stat()
            except FileNotFoundError:
                continue
            newest = i == len(batches) - 1
            if older_than_ms is None or newest or stat.st_mtime * 1000 >= older_than_ms:
                report.kept_bytes += stat.st_size
                continue
            batch.unlink(missing_ok=True)
            report.deleted += 1
            report.deleted_bytes += stat.st_size

    def run(self, stop: threading.Event, every_s: float) -> None:
        """Trim every ``every_s`` seconds until ``stop`` is set."""
        while not stop.wait(every_s):
            try:
                report = self.trim()
            except OSError as exc:
                log.error("retention trim failed; next try later", extra={"error": str(exc)})
                continue
            if report.deleted:
                log.info(
                    "retention trimmed",
                    extra={"batches": report.deleted, "bytes": report.deleted_bytes},
                )
