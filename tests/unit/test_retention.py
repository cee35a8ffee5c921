"""The retention trimmer of the durable broker's store."""

from __future__ import annotations

import os
from pathlib import Path

from kllm.ops.retention import Trimmer, retention_ms
from topics import CHANGELOGS, REQUESTS, TOKENS, inference_topic

NOW = 1_800_000_000.0


def _batch(bucket: Path, topic: str, offset: int, age_s: float, size: int = 100) -> Path:
    records = bucket / "clusters" / "c" / "topics" / topic / "partitions" / "0000000000" / "records"
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{offset:020d}.batch"
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_declared_retention_and_what_is_kept_whole() -> None:
    assert retention_ms(REQUESTS.name) == REQUESTS.retention_ms
    assert retention_ms(REQUESTS.dlq.name) == REQUESTS.dlq.retention_ms
    assert retention_ms(inference_topic("gpu").name) == inference_topic("gpu").retention_ms
    assert retention_ms(inference_topic("gpu").dlq.name) == inference_topic("gpu").dlq.retention_ms
    assert retention_ms(CHANGELOGS[0].name) is None  # compacted: state
    assert retention_ms("someone.elses.topic") is None


def test_trims_past_retention_and_keeps_each_partitions_newest(tmp_path: Path) -> None:
    day = 24 * 3600.0
    old = _batch(tmp_path, TOKENS.name, 0, 2 * day)
    recent = _batch(tmp_path, TOKENS.name, 1, 0.5 * day)
    lone_old = _batch(tmp_path, REQUESTS.name, 0, 30 * day)  # newest of its partition
    state = _batch(tmp_path, CHANGELOGS[0].name, 0, 400 * day)
    foreign = _batch(tmp_path, "someone.elses.topic", 0, 400 * day)
    _batch(tmp_path, "someone.elses.topic", 1, 1)
    report = Trimmer(tmp_path, clock=lambda: NOW).trim()
    assert not old.exists()
    assert recent.exists() and lone_old.exists() and state.exists() and foreign.exists()
    assert report.deleted == 1 and report.deleted_bytes == 100


def test_the_cap_shortens_every_declared_retention(tmp_path: Path) -> None:
    batches = [_batch(tmp_path, REQUESTS.name, i, age) for i, age in enumerate((90, 50, 10, 1))]
    Trimmer(tmp_path, cap_s=60, clock=lambda: NOW).trim()
    assert [b.exists() for b in batches] == [False, True, True, True]
