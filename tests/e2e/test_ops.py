"""Operating the pipeline: metrics of every stage, consumer lag, and the live
dashboard, rendered by a real headless Chromium (screenshot kept with the test output)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from kllm.keys import KeyStore
from kllm.lag import consumer_lag
from kllm.supervisor import STAGES, Supervisor
from tests.e2e.conftest import Client
from topics import DOCUMENTS_INDEXED

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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_dashboard_renders_live_figures_in_chromium(pipeline: Supervisor, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}"
    assert "kllm pipeline" in httpx.get(f"{base}/dashboard", timeout=10).text  # starts the monitor
    for _ in range(60):
        if httpx.get(f"{base}/dashboard/data", timeout=10).json()["tailing"]:
            break
        time.sleep(0.5)
    _ask(pipeline, 3)
    data: dict[str, object] = {}
    for _ in range(30):
        data = httpx.get(f"{base}/dashboard/data", timeout=10).json()
        latency = data["latency_ms"]
        if all(latency[s]["n"] for s in ("ingestion", "retrieval", "inference", "moderation")):  # type: ignore[index]
            break
        time.sleep(1)
    assert data["throughput"] and data["lag"], data  # type: ignore[index]
    assert all(data["latency_ms"][s]["p50"] is not None for s in ("ingestion", "moderation"))  # type: ignore[index]
    OUT.mkdir(exist_ok=True)
    shot, dom = OUT / "dashboard.png", tmp_path / "dom.html"
    run = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--virtual-time-budget=6000",
    ]
    subprocess.run(
        [*run, f"--screenshot={shot}", f"{base}/dashboard"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    page = subprocess.run(
        [*run, "--dump-dom", f"{base}/dashboard"],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    dom.write_text(page)
    assert shot.stat().st_size > 10_000
    assert "llm.responses" in page and "kllm-inference" in page  # figures, not the empty page
    print(f"dashboard screenshot: {shot}")
