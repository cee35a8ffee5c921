"""The embedded broker on memory and on durable storage, compared in one run.

For each storage in turn, on a broker of its own (the durable one with its storage
server, its data under a temporary folder):

- produce throughput: --records records of --size bytes to the tokens topic (four
  partitions), acks=all, as fast as the producer batches them;
- produce latency: --latency-records records one at a time, each awaited (p50/p99);
- consume throughput: the same records read back by one consumer;
- idle CPU: ten group consumers polling idle topics for --idle-s seconds; the CPU of the
  broker's processes (Tansu, and the storage server when durable), in cores;
- the pipeline's end-to-end overhead at --rate requests/s through the gateway (every
  stage a process, a scripted engine that answers at once): time end to end minus the
  engine's own, p50/p99.

Then, on durable storage only, disk use under a long load: records at --disk-mb-s MB/s
for --disk-s seconds with every batch kept at most --cap-s seconds
(KLLM_BROKER_RETENTION_CAP_S), the data folder's size sampled as it runs. It stays near
the cap's worth of data, not the total produced.

    python loadtest/broker_bench.py

Every consumer uses the stages' own fetch wait (KLLM_FETCH_WAIT_MAX_MS) on either
storage. Time limit: the whole run, startup and teardown included, ends within --limit-s (default
720 s); a phase with no time left is reported as NOT RUN. Every process it starts is
stopped at the end, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from harness import Deadline, add_limit_arg, pct, run_limited
from openloop import Phase, _pipeline, run

from kllm.ops.broker import EmbeddedBroker, Storage
from kllm.runtime.kafka import ConfluentTopicAdmin, make_producer, produce_sync
from kllm.runtime.settings import KafkaSettings
from topics import BENCH_IDLE_GROUP, TAIL_GROUP, TOKENS, declared, provision

LIMIT_S = 720
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""
STORAGES: tuple[Storage, ...] = ("memory", "durable")
IDLE_CONSUMERS = 10
STAGE_PRODUCER = KafkaSettings().producer_config()
"""The stages' producer settings (acks=all, idempotent, linger 1 ms)."""


@dataclass
class Figures:
    """What one storage measured; NaN where a phase did not run."""

    storage: Storage
    produce_per_s: float = float("nan")
    produce_mb_s: float = float("nan")
    latency_ms: list[float] = field(default_factory=list)
    consume_per_s: float = float("nan")
    idle_cores: float = float("nan")
    overhead_ms: list[float] = field(default_factory=list)
    pipeline_note: str = ""
    data_bytes: int = 0  # the data folder after the produce phases (durable)
    payload_bytes: int = 0


@dataclass
class DiskRun:
    cap_s: float
    produced_bytes: int = 0
    sizes: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=20_000, help="records to produce (20000)")
    p.add_argument("--size", type=int, default=512, help="bytes per record (512)")
    p.add_argument("--latency-records", type=int, default=300, help="awaited produces (300)")
    p.add_argument("--idle-s", type=float, default=20, help="idle CPU window, seconds (20)")
    p.add_argument("--rate", type=float, default=10, help="pipeline requests/s (10)")
    p.add_argument("--seconds", type=float, default=20, help="pipeline load, seconds (20)")
    p.add_argument("--disk-s", type=float, default=120, help="disk phase, seconds (120)")
    p.add_argument("--disk-mb-s", type=float, default=1.0, help="disk phase MB/s (1.0)")
    p.add_argument("--cap-s", type=float, default=30, help="retention cap, disk phase (30)")
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda deadline: _main(args, deadline), args.limit_s)


def _main(args: argparse.Namespace, deadline: Deadline) -> int:
    figures = [Figures(s) for s in STORAGES]
    disk: DiskRun | None = None
    not_run: list[str] = []
    try:
        for fig in figures:
            if deadline.left() < 60:
                not_run.append(f"{fig.storage}: broker")
                continue
            _broker_phases(fig, args, deadline)
        for fig in figures:
            if deadline.left() < args.seconds + 90:
                not_run.append(f"{fig.storage}: pipeline")
                continue
            _pipeline_phase(fig, args, deadline)
        if deadline.left() < args.disk_s + 30:
            not_run.append("durable: disk")
        else:
            disk = DiskRun(args.cap_s)
            _disk_phase(disk, args, deadline)
    finally:
        print(report(figures, disk))
        for what in not_run:
            print(f"NOT RUN (time limit): {what}")
    return 0 if not not_run and all(not f.pipeline_note for f in figures) else 1


# -- the broker alone -------------------------------------------------------------------------


@contextmanager
def _broker(
    storage: Storage, retention_cap_s: float = 0.0
) -> Iterator[tuple[EmbeddedBroker, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "broker"
        broker = EmbeddedBroker(storage=storage, data_dir=data, retention_cap_s=retention_cap_s)
        with broker:
            provision(ConfluentTopicAdmin(broker.bootstrap), declared())
            yield broker, data


FETCH_WAIT_MS = KafkaSettings().fetch_wait_max_ms
"""The stages' fetch wait, used by every consumer here on either storage."""


def _broker_phases(fig: Figures, args: argparse.Namespace, deadline: Deadline) -> None:
    with _broker(fig.storage) as (broker, data):
        print(f"{fig.storage}: broker at {broker.bootstrap}", file=sys.stderr, flush=True)
        fig.produce_per_s, fig.produce_mb_s = produce_throughput(
            broker.bootstrap, args.records, args.size
        )
        fig.latency_ms = produce_latency(broker.bootstrap, args.latency_records, args.size)
        fig.consume_per_s = consume_throughput(
            broker.bootstrap, args.records + args.latency_records, FETCH_WAIT_MS
        )
        fig.payload_bytes = (args.records + args.latency_records) * args.size
        fig.data_bytes = folder_bytes(data) if fig.storage == "durable" else 0
        if deadline.left() > args.idle_s + 20:
            fig.idle_cores = idle_cpu(broker, FETCH_WAIT_MS, args.idle_s)
        print(f"{fig.storage}: broker phases done", file=sys.stderr, flush=True)


def produce_throughput(bootstrap: str, records: int, size: int) -> tuple[float, float]:
    """Records/s and MB/s of one producer (acks=all) sending ``records`` as fast as it
    batches them, timed until the last is acknowledged."""
    producer = make_producer(bootstrap, STAGE_PRODUCER)
    value = b"x" * size
    failed: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    t0 = time.perf_counter()
    for i in range(records):
        _produce(producer, value, i, report)
        producer.poll(0)
    left = producer.flush(120)
    took = time.perf_counter() - t0
    if left or failed:
        raise RuntimeError(f"{left} records unsent, {len(failed)} failed: {failed[:3]}")
    return records / took, records * size / took / 1e6


def produce_latency(bootstrap: str, records: int, size: int) -> list[float]:
    """Milliseconds from produce to acknowledgement (acks=all), one record at a time."""
    producer = make_producer(bootstrap, STAGE_PRODUCER)
    value = b"y" * size
    out = []
    for i in range(records):
        t0 = time.perf_counter()
        produce_sync(producer, TOKENS.name, f"lat-{i}", value)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def consume_throughput(bootstrap: str, records: int, fetch_wait_ms: int) -> float:
    """Records/s of one consumer reading ``records`` from the start of the topic."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": TAIL_GROUP,  # assigned: never joins or commits
            "enable.auto.commit": False,
            "fetch.wait.max.ms": fetch_wait_ms,
        }
    )
    try:
        consumer.assign([TopicPartition(TOKENS.name, p, 0) for p in range(TOKENS.partitions)])
        seen, t0 = 0, time.perf_counter()
        end = t0 + 120
        while seen < records and time.perf_counter() < end:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    seen += 1
        took = time.perf_counter() - t0
    finally:
        consumer.close()
    if seen < records:
        raise RuntimeError(f"read back {seen} of {records} records in 120 s")
    return seen / took


def idle_cpu(broker: EmbeddedBroker, fetch_wait_ms: int, seconds: float) -> float:
    """Cores the broker's processes use while ``IDLE_CONSUMERS`` group consumers poll
    idle topics (after their groups have joined)."""
    stop = threading.Event()
    consumers = [
        Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": f"{BENCH_IDLE_GROUP}-{i}",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
                "fetch.wait.max.ms": fetch_wait_ms,
            }
        )
        for i in range(IDLE_CONSUMERS)
    ]
    idle_topics = [t.name for t in declared() if t.name != TOKENS.name][:IDLE_CONSUMERS]
    for consumer, topic in zip(consumers, idle_topics, strict=False):
        consumer.subscribe([topic])

    def poll() -> None:
        while not stop.is_set():
            for consumer in consumers:
                consumer.poll(0.02)

    poller = threading.Thread(target=poll, name="idle-consumers", daemon=True)
    poller.start()
    try:
        time.sleep(10)  # the groups join, then sit idle
        pids = [p for p in (broker.pid, broker.storage_pid) if p is not None]
        before, t0 = cpu_seconds(pids), time.perf_counter()
        time.sleep(seconds)
        return (cpu_seconds(pids) - before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        poller.join(5)
        for consumer in consumers:
            consumer.close()


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds the processes have used (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        # Fields after the command name, which sits in parentheses and may hold spaces.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (their sizes, not the blocks they take)."""
    total = 0
    for entry in path.rglob("*"):
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            continue  # trimmed while we looked
    return total


# -- the pipeline -----------------------------------------------------------------------------


def _pipeline_phase(fig: Figures, args: argparse.Namespace, deadline: Deadline) -> None:
    with _pipeline("scripted", traced=False, cache=False, storage=fig.storage) as (
        url,
        keys,
        model,
        _run_dir,
    ):
        phase = Phase(args.rate, args.seconds)
        until = deadline.within(args.seconds + 30)
        asyncio.run(run(url, keys, model, args.rate, args.seconds, until, phase))
    ok = [s for s in phase.samples if s.status == 200 and s.engine_ms is not None]
    fig.overhead_ms = [s.e2e_ms - (s.engine_ms or 0.0) for s in ok]
    failed = sum(s.status != 200 for s in phase.samples)
    fig.pipeline_note = phase.note() or (f"{failed} requests failed" if failed else "")
    print(f"{fig.storage}: pipeline at {args.rate:.0f}/s done", file=sys.stderr, flush=True)


# -- disk use ---------------------------------------------------------------------------------


def _disk_phase(disk: DiskRun, args: argparse.Namespace, deadline: Deadline) -> None:
    per_record = 1024
    per_s = max(1, int(args.disk_mb_s * 1e6 / per_record))
    with _broker("durable", retention_cap_s=args.cap_s) as (broker, data):
        producer = make_producer(broker.bootstrap, STAGE_PRODUCER)
        value = b"z" * per_record
        t0 = time.monotonic()
        sample_at = t0
        sent = 0
        while (now := time.monotonic()) - t0 < args.disk_s and not deadline.expired():
            due = int((now - t0) * per_s)
            for _ in range(due - sent):
                _produce(producer, value, sent)
                sent += 1
            producer.poll(0)
            if now >= sample_at:
                disk.sizes.append((now - t0, folder_bytes(data)))
                sample_at += 5
            time.sleep(0.01)
        producer.flush(60)
        disk.produced_bytes = sent * per_record
        disk.sizes.append((time.monotonic() - t0, folder_bytes(data)))


def _produce(
    producer: Producer, value: bytes, i: int, report: Callable[[object, object], None] | None = None
) -> None:
    while True:
        try:
            producer.produce(TOKENS.name, key=str(i).encode(), value=value, on_delivery=report)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.05)
        except KafkaException as exc:
            raise RuntimeError(f"cannot produce: {exc}") from exc


# -- the report -------------------------------------------------------------------------------


def _ratio(durable: float, memory: float) -> str:
    """durable/memory, or "-" where either was not measured (NaN) or memory is 0."""
    if math.isnan(durable) or math.isnan(memory) or memory == 0:
        return "-"
    return f"{durable / memory:.2f}x"


def report(figures: list[Figures], disk: DiskRun | None) -> str:
    mem, dur = figures
    rows = [
        ("produce, records/s", mem.produce_per_s, dur.produce_per_s, ".0f"),
        ("produce, MB/s", mem.produce_mb_s, dur.produce_mb_s, ".2f"),
        ("produce latency p50, ms", pct(mem.latency_ms, 0.5), pct(dur.latency_ms, 0.5), ".1f"),
        ("produce latency p99, ms", pct(mem.latency_ms, 0.99), pct(dur.latency_ms, 0.99), ".1f"),
        ("consume, records/s", mem.consume_per_s, dur.consume_per_s, ".0f"),
        (f"idle CPU, {IDLE_CONSUMERS} consumers, cores", mem.idle_cores, dur.idle_cores, ".3f"),
        (
            "pipeline overhead p50, ms",
            pct(mem.overhead_ms, 0.5),
            pct(dur.overhead_ms, 0.5),
            ".0f",
        ),
        (
            "pipeline overhead p99, ms",
            pct(mem.overhead_ms, 0.99),
            pct(dur.overhead_ms, 0.99),
            ".0f",
        ),
    ]
    lines = [f"{'':40s} {'memory':>10s} {'durable':>10s}  durable/memory"]
    for name, m, d, fmt in rows:
        lines.append(f"{name:40s} {m:>10{fmt}} {d:>10{fmt}}  {_ratio(d, m)}")
    for fig in figures:
        if fig.pipeline_note:
            lines.append(f"  {fig.storage} pipeline: {fig.pipeline_note}")
    if dur.payload_bytes:
        lines.append(
            f"durable data folder after {dur.payload_bytes / 1e6:.1f} MB of payload: "
            f"{dur.data_bytes / 1e6:.1f} MB ({dur.data_bytes / dur.payload_bytes:.2f}x)"
        )
    if disk and disk.sizes:
        peak = max(size for _t, size in disk.sizes)
        final = disk.sizes[-1][1]
        lines.append(
            f"disk under load (retention cap {disk.cap_s:.0f} s): produced "
            f"{disk.produced_bytes / 1e6:.1f} MB in {disk.sizes[-1][0]:.0f} s; data folder "
            f"peak {peak / 1e6:.1f} MB, at the end {final / 1e6:.1f} MB "
            f"({final / max(disk.produced_bytes, 1):.2f}x of what was produced)"
        )
        lines.append(
            "  size over time (s: MB): "
            + ", ".join(f"{t:.0f}: {size / 1e6:.1f}" for t, size in disk.sizes)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
