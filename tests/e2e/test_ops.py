"""Operating the pipeline: metrics of every stage, consumer lag, and the live
dashboard, rendered by a real headless Chromium (screenshot kept with the test output)."""

from __future__ import annotations

import itertools
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from kllm.cli import commands as cli
from kllm.cli.trace import SpanRow, find_trace, read_spans
from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import STAGES, Supervisor
from kllm.runtime.lag import consumer_lag
from kllm.runtime.tracing import TRACES_DIR
from tests import needs
from tests.e2e.conftest import Client, wait_until
from topics import DOCUMENTS_INDEXED, RESPONSES, inference_group

OUT = Path(__file__).resolve().parents[2] / ".pytest-output"


def _ask(pipeline: Supervisor, n: int) -> None:
    url = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}/v1/chat/completions"
    key = KeyStore(Path(pipeline.env["KLLM_RUN_DIR"]) / "keys.json").create("ops")[1]
    for i in range(n):
        body = {
            "model": "smollm2-135m",
            "messages": [
                {"role": "user", "content": f"Ops {i} {uuid.uuid4().hex[:6]}: what is a DLQ?"}
            ],
            "max_tokens": 8,
        }
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text


def test_every_stage_serves_its_metrics(pipeline: Supervisor) -> None:
    _ask(pipeline, 2)
    base = int(pipeline.env["KLLM_METRICS_BASE_PORT"])
    for stage in ("ingestion", "retrieval", "inference", "moderation"):
        port = base + STAGES.index(stage) * 16
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert f'kllm_records_in_total{{stage="{stage}"' in text, stage
        assert "kllm_record_seconds_bucket" in text
    inference = httpx.get(f"http://127.0.0.1:{base + STAGES.index('inference') * 16}/metrics").text
    assert 'kllm_tokens_total{kind="completion",model="smollm2-135m"}' in inference
    gateway = httpx.get(f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}/metrics").text
    assert 'kllm_gateway_requests_total{status="200"}' in gateway


def test_lag_is_end_minus_committed_per_partition(client: Client) -> None:
    topic = DOCUMENTS_INDEXED.name
    group = f"lag-check-{uuid.uuid4().hex[:6]}"
    for i in range(6):
        # One batch per record: Tansu reports a high watermark inside a multi-record batch
        # (see DESIGN.md); real Kafka does not, and the computation is the standard one.
        client.producer.produce(topic, key="k", value=b"x" * (i + 1), partition=0)
        client.producer.flush(10)
    consumer = Consumer({"bootstrap.servers": client.bootstrap, "group.id": group})
    try:
        _low, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.commit(offsets=[TopicPartition(topic, 0, end - 4)], asynchronous=False)
    finally:
        consumer.close()
    rows = {r.partition: r for r in consumer_lag(client.bootstrap, {group: [topic]})}
    assert rows[0].committed == end - 4 and rows[0].lag == 4
    assert all(r.committed is None for p, r in rows.items() if p != 0)


def test_dashboard_renders_live_figures_in_chromium(pipeline: Supervisor, tmp_path: Path) -> None:
    chromium = needs.executable("chromium", "make system-packages, as root")
    base = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}"
    assert "kllm pipeline" in httpx.get(f"{base}/dashboard", timeout=10).text  # starts the monitor
    wait_until(
        lambda: httpx.get(f"{base}/dashboard/data", timeout=10).json()["tailing"],
        30,
        "the dashboard's monitor to tail the topics",
        every_s=0.5,
    )
    _ask(pipeline, 3)
    data: dict[str, Any] = {}

    def every_stage_measured() -> bool:
        data.update(httpx.get(f"{base}/dashboard/data", timeout=10).json())
        latency = data["latency_ms"]
        return all(latency[s]["n"] for s in ("ingestion", "retrieval", "inference", "moderation"))

    wait_until(every_stage_measured, 30, lambda: f"latencies of every stage: {data}", 1.0)
    assert data["throughput"] and data["lag"], data
    assert all(data["latency_ms"][s]["p50"] is not None for s in ("ingestion", "moderation"))
    OUT.mkdir(exist_ok=True)
    shot, dom = OUT / "dashboard.png", tmp_path / "dom.html"
    run = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--virtual-time-budget=6000",
    ]
    pipeline.write_status()  # as `kllm up` does: the stage processes' card shows them
    subprocess.run(
        [*run, f"--screenshot={shot}", f"{base}/dashboard"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    pipeline.write_status()
    page = subprocess.run(
        [*run, "--dump-dom", f"{base}/dashboard"],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    dom.write_text(page)
    assert shot.stat().st_size > 10_000
    # Figures, not the empty page:
    assert RESPONSES.name in page and inference_group().name in page
    assert re.search(r"<td>drift-0</td><td>running</td>", page), page
    print(f"dashboard screenshot: {shot}")


def test_one_request_is_one_trace_across_the_stages(
    pipeline: Supervisor, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    url = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}/v1/chat/completions"
    key = KeyStore(Path(pipeline.env["KLLM_RUN_DIR"]) / "keys.json").create("trace")[1]
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": f"Trace {caller_trace[:6]}: what is lag?"}],
        "max_tokens": 8,
    }
    headers = {
        "authorization": f"Bearer {key}",
        "traceparent": f"00-{caller_trace}-{caller_span}-01",
    }
    r = httpx.post(url, json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-kllm-trace-id"] == caller_trace  # the caller's trace goes on
    folder = Path(pipeline.env["KLLM_RUN_DIR"]) / TRACES_DIR
    wanted = {"gateway", "ingestion", "retrieval", "inference", "moderation"}
    spans: list[SpanRow] = []
    stages: dict[str, SpanRow] = {}

    def every_stage_traced() -> bool:
        spans[:] = find_trace(read_spans(folder), caller_trace)
        # A stage's span is named after it; the gateway's after the HTTP route.
        stages.clear()
        stages.update({s.name.removesuffix(" process"): s for s in spans})
        gateway = next((s for s in spans if s.service == "kllm-gateway"), None)
        if gateway is not None:
            stages["gateway"] = gateway
        return wanted <= set(stages)

    # Each process exports its spans every half second.
    wait_until(
        every_stage_traced,
        20,
        lambda: f"spans of {sorted(wanted)}: {[(s.service, s.name) for s in spans]}",
        every_s=0.5,
    )
    assert stages["gateway"].parent_id == caller_span
    # Each stage's span is the child of the span that produced the record it consumed.
    by_id = {s.span_id: s for s in spans}
    chain = ["moderation", "inference", "retrieval", "ingestion", "gateway"]
    for child, parent in itertools.pairwise(chain):
        assert by_id[stages[child].parent_id or ""] == stages[parent], child
    assert stages["inference"].attributes["kllm.request_id"] == r.headers["x-request-id"]
    # The answer also reached its other readers, in the same trace.
    assert {"cache", "feedback"} <= set(stages)

    monkeypatch.setenv("KLLM_RUN_DIR", pipeline.env["KLLM_RUN_DIR"])
    assert cli.main(["trace", r.headers["x-request-id"]]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"trace {caller_trace}")
    assert all(f"{stage}: {stage} process" in shown for stage in wanted - {"gateway"})
