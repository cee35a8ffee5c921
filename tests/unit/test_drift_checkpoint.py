"""services.drift: the detector checkpoint file and building the stage from settings."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from kllm.core.errors import ConfigError
from kllm.testing.drift_streams import NOISE, latency_responses, process_in_batches
from processors import drift_state
from processors.base import Emit
from processors.drift import DriftMonitor, PromptReference
from processors.drift_signals import DriftStage
from schemas import Message, Request
from services.drift import Checkpoint, Settings, build
from tests.unit.conftest import FakeEmbedder


def checkpoint_at(path: Path) -> Checkpoint:
    return Checkpoint(path, drift_state.dumps, drift_state.loads)


def state_of(stage: DriftStage) -> drift_state.State:
    return stage.monitor, stage.reference


@pytest.fixture(autouse=True)
def no_kllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KLLM_"):
            monkeypatch.delenv(name)


def new_stage(embedder: FakeEmbedder) -> DriftStage:
    return DriftStage(DriftMonitor(warmup=20, cooldown=10), PromptReference(size=3), embedder.embed)


def batch(lo: int, latency: float) -> list[Message]:
    """Ten responses and two requests, tenant acme."""
    out: list[Message] = [*latency_responses(lo, lambda i: latency * NOISE[i % 10] / 100)]
    words = ("kafka topics", "partition offsets", "consumer groups")
    out += [
        Request(request_id=f"q{i}", tenant="acme", prompt=words[i % 3], created_at=float(i))
        for i in (lo, lo + 1)
    ]
    return out


def feed(stage: DriftStage, start: int, end: int, latency: float) -> list[Emit]:
    return process_in_batches(stage, lambda lo: batch(lo, latency), start, end)


def test_save_then_load_continues_identically(tmp_path: Path, embedder: FakeEmbedder) -> None:
    original = new_stage(embedder)
    assert feed(original, 0, 60, 100.0) == []
    checkpoint = checkpoint_at(tmp_path / "drift" / "state.pkl")
    checkpoint.save(state_of(original))  # creates the folder

    loaded = checkpoint.load()
    assert loaded is not None
    monitor, reference = loaded
    assert isinstance(monitor, DriftMonitor)
    assert isinstance(reference, PromptReference)
    assert monitor is not original.monitor
    assert monitor.streams() == original.monitor.streams()
    assert reference.ready("acme", "default")
    restored = DriftStage(monitor, reference, embedder.embed)

    after_original = feed(original, 60, 160, 1000.0)
    after_restored = feed(restored, 60, 160, 1000.0)
    assert [e.key for e in after_original] == ["acme/m"]  # the latency shift was seen
    assert after_restored == after_original
    assert restored.monitor.streams() == original.monitor.streams()
    v = FakeEmbedder.vector("consumer groups")
    assert restored.reference.distance("acme", "default", v) == pytest.approx(
        original.reference.distance("acme", "default", v)
    )


def test_missing_file_loads_nothing(tmp_path: Path) -> None:
    assert checkpoint_at(tmp_path / "none.pkl").load() is None


@pytest.mark.parametrize(
    "body", [b"", b"garbage", b'{"version": 1}', b"\x00" * 64], ids=["empty", "text", "json", "nul"]
)
def test_corrupt_file_is_a_config_error_naming_it(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "s.pkl"
    path.write_bytes(body)
    with pytest.raises(ConfigError) as info:
        checkpoint_at(path).load()
    assert str(path) in str(info.value)


def test_truncated_checkpoint_is_a_config_error(tmp_path: Path, embedder: FakeEmbedder) -> None:
    stage = new_stage(embedder)
    feed(stage, 0, 30, 100.0)
    path = tmp_path / "s.pkl"
    checkpoint_at(path).save(state_of(stage))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        checkpoint_at(path).load()


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x04\x8c\x01\xff.",  # a short string whose byte is not UTF-8
        b"\x80\x09",  # an unknown pickle protocol (a newer Python's, or a damaged header)
    ],
    ids=["bad-utf8", "bad-protocol"],
)
def test_damaged_bytes_are_a_config_error(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "s.pkl"
    path.write_bytes(body)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        checkpoint_at(path).load()


@pytest.mark.parametrize(
    "saved", [None, [1, 2], {"version": drift_state.VERSION}], ids=["none", "list", "no-state"]
)
def test_a_pickle_of_something_else_is_a_config_error(tmp_path: Path, saved: Any) -> None:
    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps(saved))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        checkpoint_at(path).load()


def test_a_checkpoint_of_moved_code_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "s.pkl"
    # protocol 4: STACK_GLOBAL of ("processors.gone", "DriftMonitor")
    path.write_bytes(b"\x80\x04\x8c\x0fprocessors.gone\x94\x8c\x0cDriftMonitor\x94\x93\x94.")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        checkpoint_at(path).load()


@pytest.mark.parametrize("version", [drift_state.VERSION + 1, 0, None])
def test_wrong_version_is_a_config_error(tmp_path: Path, version: int | None) -> None:
    path = tmp_path / "s.pkl"
    body = {"version": version, "monitor": DriftMonitor(), "reference": PromptReference()}
    path.write_bytes(pickle.dumps(body))
    with pytest.raises(ConfigError, match="another version"):
        checkpoint_at(path).load()


def test_save_is_atomic_and_replaces(tmp_path: Path, embedder: FakeEmbedder) -> None:
    stage = new_stage(embedder)
    path = tmp_path / "s.pkl"
    checkpoint = checkpoint_at(path)
    checkpoint.save(state_of(stage))
    first = path.read_bytes()
    feed(stage, 0, 20, 100.0)
    checkpoint.save(state_of(stage))
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pkl"]  # no .tmp left behind
    loaded = checkpoint.load()
    assert loaded is not None
    assert loaded[0].streams() == stage.monitor.streams()


def test_save_writes_a_temporary_file_first(
    tmp_path: Path, embedder: FakeEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = new_stage(embedder)
    path = tmp_path / "s.pkl"
    checkpoint = checkpoint_at(path)
    checkpoint.save(state_of(stage))
    before = path.read_bytes()
    feed(stage, 0, 20, 100.0)

    def crash(_src: Any, _dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("kllm.runtime.checkpointed.os.replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.save(state_of(stage))
    assert path.read_bytes() == before  # a crash mid-save leaves the old checkpoint whole


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "run_dir": tmp_path / "run",
        "drift_checkpoint": tmp_path / "s.pkl",
        "drift_warmup": 20,
        "drift_cooldown": 10,
        "drift_reference_size": 12,
        "bootstrap_servers": "localhost:1",
    }
    base.update(kw)
    return Settings(**base)


def test_build_starts_fresh_then_resumes(tmp_path: Path, embedder: FakeEmbedder) -> None:
    s = settings(tmp_path)
    stage, checkpoint = build(s, embed=embedder.embed)
    assert checkpoint.path == tmp_path / "s.pkl"
    assert stage.monitor.streams() == []
    assert (stage.monitor.warmup, stage.monitor.cooldown) == (20, 10)
    assert stage.reference.size == 12
    assert stage.embed == embedder.embed

    feed(stage, 0, 40, 100.0)
    checkpoint.save(state_of(stage))

    resumed, checkpoint2 = build(s, embed=embedder.embed)
    assert checkpoint2.path == checkpoint.path
    assert resumed.monitor is not stage.monitor
    assert resumed.monitor.streams() == stage.monitor.streams() != []
    assert ("acme", "m", "latency_ms") in resumed.monitor.streams()
    assert resumed.reference.size == 12
    assert feed(resumed, 40, 80, 100.0) == feed(stage, 40, 80, 100.0)


def test_default_checkpoint_path_is_in_the_run_folder(tmp_path: Path) -> None:
    s = settings(tmp_path, drift_checkpoint=None)
    assert s.checkpoint_path() == tmp_path / "run" / "drift" / "state.pkl"


def test_build_with_a_corrupt_checkpoint_fails(tmp_path: Path, embedder: FakeEmbedder) -> None:
    (tmp_path / "s.pkl").write_bytes(b"garbage")
    with pytest.raises(ConfigError):
        build(settings(tmp_path), embed=embedder.embed)
