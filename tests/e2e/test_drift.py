"""The drift stage as a process on a real broker: alerts on a shift, and a restart
that resumes its detectors from the checkpoint instead of relearning."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kllm.ops.broker import EmbeddedBroker
from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin, TailReader, make_producer
from schemas import DriftAlert, Response, decode, encode
from tests.e2e.conftest import CONSUMER, FAST_GROUPS, Delivered, embedded_broker, wait_committed
from topics import DRIFT_ALERTS, DRIFT_GROUP, RESPONSES, declared, provision

WARMUP = 100


@pytest.fixture()
def drift(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, Supervisor]]:
    with embedded_broker(tmp_path / "broker.log") as broker:
        provision(ConfluentTopicAdmin(broker.bootstrap), declared())
        env = {
            "KLLM_BOOTSTRAP_SERVERS": broker.bootstrap,
            "KLLM_RUN_DIR": str(tmp_path / "run"),
            "KLLM_DRIFT_WARMUP": str(WARMUP),
            "KLLM_DRIFT_CHECKPOINT_EVERY_S": "0.5",
            "KLLM_DRIFT_EMBED_PER_S": "0",  # the test publishes faster than the budget
            **FAST_GROUPS,
        }
        sup = Supervisor(tmp_path / "run", env, stages=("drift",))
        sup.start_all()
        try:
            sup.wait_ready(120, bootstrap=broker.bootstrap)
            yield broker, sup
        finally:
            sup.stop_all()


def publish_latencies(
    bootstrap: str, values: list[float], tenant: str
) -> dict[tuple[str, int], int]:
    """Publish one Response per value; return the end offsets delivered, per partition."""
    producer, delivered = make_producer(bootstrap), Delivered()
    for ms in values:
        rid = f"d-{uuid.uuid4()}"
        r = Response(
            request_id=rid,
            tenant=tenant,
            text="ok",
            verdict="allowed",
            model="m",
            finish_reason="stop",
            pipeline_ms=ms,
            ttft_ms=ms / 5,
        )
        producer.produce(RESPONSES.name, key=rid, value=encode(r), on_delivery=delivered)
        producer.poll(0)
    return delivered.flushed(producer)


def alerts_for(reader: TailReader, tenant: str, seconds: float) -> list[DriftAlert]:
    found = []
    for _key, value in reader.records(seconds):
        alert = decode(value, DriftAlert)
        if alert.tenant == tenant:
            found.append(alert)
            if alert.signal == "latency_ms":
                break
    return found


def test_a_restarted_detector_resumes_and_catches_the_shift(
    drift: tuple[EmbeddedBroker, Supervisor],
) -> None:
    broker, sup = drift
    rng = random.Random(3)
    calm = [rng.lognormvariate(6.2, 0.3) for _ in range(WARMUP + 200)]  # ~500 ms
    slow = [3 * rng.lognormvariate(6.2, 0.3) for _ in range(400)]
    reader = TailReader(broker.bootstrap, DRIFT_ALERTS.name, CONSUMER)
    try:
        ends = publish_latencies(broker.bootstrap, calm, "steady")
        # The stage commits only after its checkpoint (and after flushing its alerts):
        # once all the calm traffic is committed, it is in a checkpoint.
        wait_committed(broker.bootstrap, DRIFT_GROUP.name, ends, 60)
        assert alerts_for(reader, "steady", 2) == []  # stationary: no alarm
        sup.stop_all()  # SIGTERM: a last checkpoint too
        sup.start_all()
        sup.wait_ready(120, bootstrap=broker.bootstrap)
        assert "resumed from checkpoint" in sup.procs[0].log_path.read_text()
        # Had it relearned, the slow values would become its new normal: no alert.
        publish_latencies(broker.bootstrap, slow, "steady")
        found = alerts_for(reader, "steady", 60)
    finally:
        reader.close()
    latency = [a for a in found if a.signal == "latency_ms"]
    assert latency, found
    alert = latency[0]
    assert alert.model == "m" and alert.detector
    assert alert.after["mean"] > alert.before["mean"]
    assert alert.sample_request_ids
