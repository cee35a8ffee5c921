"""The topology declaration (topics.groups), and that everything reading it covers it:
lag, the dashboard, the supervisor's wait, `kllm scale`, the stage applications."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

import topics
from kllm.cli.scale import max_replicas
from kllm.core.errors import ConfigError
from kllm.gateway import monitor as monitor_module
from kllm.gateway.keys import KeyStore
from kllm.gateway.monitor import PipelineMonitor
from kllm.ops.supervisor import ChildSettings, Supervisor
from kllm.runtime import lag as lag_module
from kllm.runtime.lag import Lag, consumer_lag, lag_groups
from kllm.runtime.quix import build_app
from kllm.runtime.settings import StageSettings
from kllm.testing.kafka import FakeProducer
from services.gateway import Settings as GatewaySettings
from services.gateway import build as build_gateway
from topics import (
    CACHE_GROUP,
    EMBEDDING_GROUP,
    GROUP_PREFIX,
    GROUPLESS,
    INDEXER_GROUP,
    RESPONSES,
    STAGES,
    ConsumerGroup,
    declared,
    groups,
    inference_group,
    primary_group,
    stage_groups,
)

POOLS = ("gpu",)


def expected(pools: tuple[str, ...] = POOLS) -> dict[str, tuple[str, ...]]:
    """Every group the pipeline runs with ``pools`` configured, from the declaration."""
    return {g.name: g.topic_names for g in groups(pools)}


# --- the declaration ------------------------------------------------------------------


def test_group_names_are_unique_and_prefixed() -> None:
    names = [g.name for g in groups(POOLS)]
    assert len(names) == len(set(names))
    assert all(n.startswith(GROUP_PREFIX) for n in names)


def test_every_stage_with_a_group_has_one_to_scale_by() -> None:
    for stage in STAGES:
        if stage in GROUPLESS:
            assert stage_groups(stage) == ()
            with pytest.raises(KeyError):
                primary_group(stage)
        else:
            assert primary_group(stage).stage == stage
    assert {g.stage for g in groups(POOLS)} == set(STAGES) - GROUPLESS


def test_inputs_are_declared_topics_and_cap_the_replicas() -> None:
    for g in groups(POOLS):
        assert g.inputs and set(g.topic_names) <= {t.name for t in declared(POOLS)}, g.name
        want = 1 if g.single_replica else min(t.partitions for t in g.inputs)
        assert g.max_replicas == want, g.name


def test_each_pool_has_its_own_group_on_its_own_topic() -> None:
    gpu = inference_group("gpu")
    assert gpu in groups(POOLS) and inference_group() in groups(POOLS)
    assert gpu.name != inference_group().name and gpu.pool == "gpu"
    assert gpu.inputs == (topics.inference_topic("gpu"),)
    assert stage_groups("inference", "gpu") == (gpu,)
    assert gpu not in groups()


def test_the_retrieval_process_runs_the_indexer_and_the_cache_filler() -> None:
    retrieval = stage_groups("retrieval")
    assert retrieval[0] == primary_group("retrieval")
    assert INDEXER_GROUP in retrieval and CACHE_GROUP in retrieval
    assert CACHE_GROUP.inputs == (RESPONSES,) and CACHE_GROUP.runs_if


def test_the_package_exports_the_declaration() -> None:
    for name in ("ConsumerGroup", "STAGES", "GROUPLESS", "groups", "stage_group", "group_id"):
        assert name in topics.__all__


# --- lag and the dashboard cover every declared group -------------------------------------


def test_lag_reads_every_declared_group_pools_and_cache_filler_included() -> None:
    got = lag_groups(POOLS)
    assert got == expected()
    assert CACHE_GROUP.name in got and inference_group("gpu").name in got


class _FakeConsumer:
    asked: ClassVar[list[str]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.asked.append(config["group.id"])

    def list_topics(self, topic: str, timeout: float) -> Any:
        partitions = {0: None}
        return type("M", (), {"topics": {topic: type("T", (), {"partitions": partitions})}})

    def committed(self, parts: list[Any], timeout: float) -> list[Any]:
        return parts

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, 3

    def close(self) -> None:
        pass


def test_consumer_lag_by_default_asks_every_declared_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _FakeConsumer.asked = []
    monkeypatch.setattr(lag_module, "Consumer", _FakeConsumer)
    rows = consumer_lag("unused:9092", pools=POOLS)
    assert _FakeConsumer.asked == list(expected())
    assert {(r.group, r.topic) for r in rows} == {
        (g, t) for g, names in expected().items() for t in names
    }


def test_the_dashboard_polls_and_shows_every_declared_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monitor = PipelineMonitor("unused:9092", pools=POOLS)
    asked: list[Any] = []

    def fake_lag(bootstrap: str, groups: Any) -> list[Lag]:
        asked.append(groups)
        monitor.close()  # one round
        return [Lag(g, t, 0, None, 0, 2) for g, names in groups.items() for t in names]

    monkeypatch.setattr(monitor_module, "consumer_lag", fake_lag)
    monitor._poll_lag()
    assert asked == [expected()]
    data = monitor.data()
    assert data["groups"] == {g: list(t) for g, t in expected().items()}
    assert {key.split(" / ")[0] for key in data["lag"]} == set(expected())


def test_the_gateway_dashboard_shows_the_configured_pools(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KLLM_INFERENCE_POOLS", '["gpu"]')
    settings = GatewaySettings(bootstrap_servers="unused:9092")
    keys = KeyStore(tmp_path / "keys.json")
    gateway = build_gateway(settings, producer=FakeProducer(), router=object(), keys=keys)  # type: ignore[arg-type]
    monkeypatch.setattr(PipelineMonitor, "start", lambda self: None)
    assert gateway.monitor().groups == expected()


# --- supervisor, `kllm scale`, the stage applications ---------------------------------------


def test_supervisor_waits_for_the_groups_its_stages_always_join(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, {"KLLM_POOL": "gpu"}, stages=("retrieval", "inference", "gateway"))
    assert sup.awaited_groups() == {
        primary_group("retrieval").name,
        INDEXER_GROUP.name,
        EMBEDDING_GROUP.name,
        inference_group("gpu").name,
    }


def test_supervisor_reads_its_configuration_through_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KLLM_METRICS_BASE_PORT", "9100")
    monkeypatch.setenv("KLLM_POOL", "cpu")
    config = ChildSettings.over({"KLLM_POOL": "gpu"})  # what it gives its children wins
    assert (config.pool, config.metrics_base_port) == ("gpu", 9100)


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in GROUPLESS])
def test_scale_caps_each_stage_by_its_declared_group(stage: str) -> None:
    group: ConsumerGroup = primary_group(stage)
    cap, why = max_replicas(stage, qdrant_server=True)
    assert cap == group.max_replicas
    assert group.name in why or group.single_replica == why


def test_a_stage_app_refuses_a_topic_its_group_does_not_read() -> None:
    settings = StageSettings(bootstrap_servers="unused:9092")
    with pytest.raises(ConfigError, match=primary_group("ingestion").name):
        build_app(settings, "ingestion", [RESPONSES])
