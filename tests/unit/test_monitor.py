"""The dashboard's stage timings from record timestamps, whatever order records arrive in."""

from __future__ import annotations

from kllm.gateway.monitor import PipelineMonitor
from schemas import Request, encode
from topics import GENERATIONS, INFERENCE, REQUESTS, RESPONSES, RETRIEVAL


def _request(rid: str) -> bytes:
    return encode(Request(request_id=rid, tenant="t", prompt="p"))


def test_stage_latency_comes_from_produce_times_in_any_arrival_order() -> None:
    monitor = PipelineMonitor("unused:9092")  # not started: records are fed by hand
    t = 1_000.0
    # The reader sees later hops first (other partitions came back sooner).
    monitor._record(RESPONSES.name, b"r1", b"{}", t + 0.100)
    monitor._record(GENERATIONS.name, b"r1", b"{}", t + 0.080)
    monitor._record(RETRIEVAL.name, b"r1", b"{}", t + 0.004)
    monitor._record(REQUESTS.name, b"tenant-key", _request("r1"), t)
    monitor._record(INFERENCE.name, b"r1", b"{}", t + 0.010)
    monitor._record(INFERENCE.name, b"r1", b"{}", t + 0.500)  # a replayed duplicate
    latency = monitor.data()["latency_ms"]
    assert {s: v["n"] for s, v in latency.items()} == {
        "ingestion": 1,
        "retrieval": 1,
        "inference": 1,
        "moderation": 1,
    }
    assert round(latency["ingestion"]["p50"]) == 4
    assert round(latency["retrieval"]["p50"]) == 6
    assert round(latency["inference"]["p50"]) == 70
    assert round(latency["moderation"]["p50"]) == 20
    assert monitor.data()["throughput"][RESPONSES.name] > 0
