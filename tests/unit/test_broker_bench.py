"""The broker benchmark's own measures (loadtest/broker_bench.py): CPU time, folder
size and the report, which must show a phase that did not run as such."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import broker_bench


def test_cpu_seconds_grows_with_work_done() -> None:
    before = broker_bench.cpu_seconds([os.getpid()])
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert broker_bench.cpu_seconds([os.getpid()]) - before >= 0.2


def test_folder_bytes_counts_files_under_every_level(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"x" * 10)
    (tmp_path / "a" / "b" / "two").write_bytes(b"y" * 32)
    assert broker_bench.folder_bytes(tmp_path) == 42
    assert broker_bench.folder_bytes(tmp_path / "missing") == 0


def test_report_gives_ratios_and_marks_what_did_not_run() -> None:
    mem = broker_bench.Figures("memory", produce_per_s=1000.0, latency_ms=[1.0] * 10)
    dur = broker_bench.Figures("durable", produce_per_s=250.0, latency_ms=[4.0] * 10)
    dur.pipeline_note = "INCOMPLETE: sent 3/200"
    disk = broker_bench.DiskRun(30, produced_bytes=100_000_000, sizes=[(0, 0), (60, 40_000_000)])
    text = broker_bench.report([mem, dur], disk)
    produce = next(line for line in text.splitlines() if line.startswith("produce, records/s"))
    assert "0.25x" in produce
    latency = next(line for line in text.splitlines() if "latency p50" in line)
    assert "4.00x" in latency
    idle = next(line for line in text.splitlines() if line.startswith("idle CPU"))
    assert "nan" in idle and idle.rstrip().endswith("-")  # not measured: no ratio
    assert "durable pipeline: INCOMPLETE" in text
    assert "peak 40.0 MB" in text and "0.40x" in text
    consume = next(line for line in text.splitlines() if line.startswith("consume"))
    assert consume.rstrip().endswith("-")  # neither measured
    assert broker_bench._ratio(float("nan"), 2.0) == "-"
    assert math.isnan(broker_bench.Figures("memory").consume_per_s)
