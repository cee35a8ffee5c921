"""DriftMonitor and PromptReference on synthetic streams (the generators of the eval script)."""

from __future__ import annotations

import itertools
import math
import pickle
import random

import pytest

from kllm.core.errors import ConfigError
from kllm.testing.drift_streams import events, feed, run
from processors.drift import (
    ADWIN,
    DETECTORS,
    PAGE_HINKLEY,
    SIGNALS,
    DriftMonitor,
    Observation,
    PromptReference,
    rating_score,
)

N = 10_000
SHIFT_AT = 5_000


def obs(
    value: float, i: int, *, signal: str = "latency_ms", tenant: str = "acme", model: str = "m"
) -> Observation:
    return Observation(tenant, model, signal, value, f"{tenant}-{model}-{i}", float(i))


# -- target 1: no false alarms on stationary streams ------------------------------------


@pytest.mark.parametrize("signal", SIGNALS)
def test_stationary_stream_raises_at_most_one_false_alarm(signal: str) -> None:
    for seed in (0, 1):
        alerts = run(signal, N, seed)
        assert len(alerts) <= 1, (seed, alerts)


# -- target 2: a shift at event 5,000 is detected within hundreds of events ------------


@pytest.mark.parametrize("signal", SIGNALS)
def test_shift_is_detected_soon_after_it_happens(signal: str) -> None:
    for seed in (0, 1):
        alerts = run(signal, N, seed + 10_000, SHIFT_AT)
        assert all(a.events_seen > SHIFT_AT for a in alerts), alerts
        assert alerts, f"{signal}: shift not detected (seed {seed})"
        delay = alerts[0].events_seen - SHIFT_AT
        assert delay <= 500, (signal, seed, delay)


# -- target 3: a pickled monitor continues exactly like the original ------------------


def test_pickled_monitor_continues_identically() -> None:
    n, shift_at, split = 8_000, 4_000, 3_000
    streams = [list(events(signal, n, 7, shift_at)) for signal in SIGNALS]
    interleaved = [
        (signal, s[i]) for i in range(n) for signal, s in zip(SIGNALS, streams, strict=True)
    ]
    original = DriftMonitor()
    for signal, ev in interleaved[: split * len(SIGNALS)]:
        feed(original, signal, ev)
    restored = pickle.loads(pickle.dumps(original))
    assert restored is not original

    rest = interleaved[split * len(SIGNALS) :]
    after_original = [a for signal, ev in rest for a in feed(original, signal, ev)]
    after_restored = [a for signal, ev in rest for a in feed(restored, signal, ev)]
    assert after_original == after_restored
    assert {a.signal for a in after_original} == set(SIGNALS)  # every shift was seen


# -- alerts ---------------------------------------------------------------------------


def test_alert_describes_the_stream_and_the_shift_direction() -> None:
    monitor = DriftMonitor()
    up = run("latency_ms", N, 3, SHIFT_AT, monitor)
    down = run("retrieval_top_score", N, 3, SHIFT_AT, monitor)
    assert len(up) == 1 and len(down) == 1

    alert = up[0]
    assert (alert.tenant, alert.model, alert.signal) == ("acme", "m", "latency_ms")
    assert alert.detector == PAGE_HINKLEY == DETECTORS["latency_ms"]
    assert alert.before["n"] == monitor.warmup
    # "after" is the part of the recent values since the estimated change: about the delay
    delay = alert.events_seen - SHIFT_AT
    assert abs(alert.after["n"] - delay) <= 5
    assert 1.6 * alert.before["mean"] < alert.after["mean"] < 2.5 * alert.before["mean"]
    assert alert.before["std"] > 0 and alert.after["std"] > 0
    expected_ids = [f"late-3-{i}" for i in range(alert.events_seen - 4, alert.events_seen + 1)]
    assert list(alert.sample_request_ids) == expected_ids
    assert alert.at == float(alert.events_seen)

    alert = down[0]
    assert alert.signal == "retrieval_top_score" and alert.detector == ADWIN
    assert alert.after["mean"] < alert.before["mean"] - 0.1
    assert all(rid.startswith("retr-3-") for rid in alert.sample_request_ids)


def test_feedback_model_error_comes_from_learn_feedback() -> None:
    monitor = DriftMonitor()
    alerts = run("feedback_model_error", N, 2, SHIFT_AT, monitor)
    assert [a.signal for a in alerts] == ["feedback_model_error"]
    assert alerts[0].detector == ADWIN
    assert alerts[0].after["mean"] > alerts[0].before["mean"]  # the error rate rose


def test_feedback_model_learns_the_relation() -> None:
    monitor = DriftMonitor()
    assert monitor.predict_negative("acme", "m", {"x": 1.0}) == 0.5
    rng = random.Random(0)
    for i in range(2_000):
        x = rng.gauss(0, 1)
        monitor.learn_feedback("acme", "m", {"x": x}, x > 0, f"r{i}", float(i))
    assert monitor.predict_negative("acme", "m", {"x": 2.0}) > 0.8
    assert monitor.predict_negative("acme", "m", {"x": -2.0}) < 0.2
    assert monitor.predict_negative("other", "m", {"x": 2.0}) == 0.5


def test_streams_of_other_tenants_and_models_are_independent() -> None:
    monitor = DriftMonitor()
    rng = random.Random(1)
    alerts = []
    for i in range(1, 4_001):
        shifted = 2.0 if i > 2_000 else 1.0
        base = rng.lognormvariate(math.log(800), 0.35)
        alerts += monitor.update(obs(shifted * base, i, tenant="acme", model="a"))
        alerts += monitor.update(obs(rng.lognormvariate(math.log(800), 0.35), i, tenant="acme"))
        alerts += monitor.update(obs(rng.lognormvariate(math.log(800), 0.35), i, tenant="globex"))
    assert [(a.tenant, a.model) for a in alerts] == [("acme", "a")]
    assert set(monitor.streams()) == {
        ("acme", "a", "latency_ms"),
        ("acme", "m", "latency_ms"),
        ("globex", "m", "latency_ms"),
    }


def test_unknown_signal_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown drift signal"):
        DriftMonitor().update(obs(1.0, 1, signal="latency"))


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup": 1}, {"cooldown": -1}, {"adwin_delta": 0.0}, {"ph_threshold": 0.0}, {"recent": 1}],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        DriftMonitor(**kwargs)  # type: ignore[arg-type]


def test_non_finite_values_are_ignored() -> None:
    monitor = DriftMonitor(warmup=10)
    assert monitor.update(obs(math.nan, 1)) == []
    assert monitor.update(obs(math.inf, 2)) == []
    assert monitor.streams() == []


def test_warmup_produces_no_alerts() -> None:
    monitor = DriftMonitor(warmup=300)
    rng = random.Random(2)
    # wild values, a x10 jump in the middle: the reference is being built, nothing to compare
    for i in range(1, 301):
        value = rng.lognormvariate(math.log(800), 1.0) * (10 if i > 150 else 1)
        for signal in SIGNALS:
            v = value if DETECTORS[signal] == PAGE_HINKLEY else float(i > 150)
            assert monitor.update(obs(v, i, signal=signal)) == []


def test_one_shift_is_one_alert() -> None:
    alerts = run("ttft_ms", 20_000, 4, 5_000)
    assert len(alerts) == 1
    alerts = run("blocked", 20_000, 4, 5_000)
    assert len(alerts) == 1


def test_cooldown_spaces_alerts_on_a_drifting_stream() -> None:
    # latency that keeps growing: alerts keep coming, but never closer than the cooldown
    monitor = DriftMonitor(warmup=200, cooldown=1_500)
    rng = random.Random(5)
    alerts = []
    for i in range(1, 10_001):
        trend = math.exp(i / 2_000)  # x e every 2,000 events
        alerts += monitor.update(obs(trend * rng.lognormvariate(math.log(800), 0.35), i))
    seen = [a.events_seen for a in alerts]
    assert len(seen) >= 2
    assert all(b - a > 1_500 for a, b in itertools.pairwise(seen))


def test_rating_score_scales_ratings_to_unit_interval() -> None:
    assert [rating_score(r) for r in (1, 2, 3, 4, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


# -- PromptReference --------------------------------------------------------------------


def test_prompt_reference_distances() -> None:
    ref = PromptReference(size=20)
    rng = random.Random(3)
    direction = [1.0, 0.0, 0.0, 0.0]
    for _ in range(20):
        noisy = [d + rng.gauss(0, 0.05) for d in direction]
        assert ref.distance("acme", "m", noisy) is None
    assert ref.ready("acme", "m")
    assert not ref.ready("acme", "other")

    same = ref.distance("acme", "m", [3.0, 0.0, 0.0, 0.0])
    orthogonal = ref.distance("acme", "m", [0.0, 1.0, 0.0, 0.0])
    assert same is not None and orthogonal is not None
    assert same == pytest.approx(0.0, abs=0.01)
    assert orthogonal == pytest.approx(1.0, abs=0.1)
    assert orthogonal > same
    # another (tenant, model) has its own reference, still warming up
    assert ref.distance("acme", "other", [0.0, 1.0, 0.0, 0.0]) is None
    # zero vectors are ignored; a changed dimension is a configuration error
    assert ref.distance("acme", "m", [0.0, 0.0, 0.0, 0.0]) is None
    with pytest.raises(ConfigError):
        ref.distance("acme", "m", [1.0, 0.0])
    # picklable, like the monitor
    restored = pickle.loads(pickle.dumps(ref))
    assert restored.distance("acme", "m", [0.0, 1.0, 0.0, 0.0]) == orthogonal
