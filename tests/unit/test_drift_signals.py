"""DriftStage: which signals each message yields, and alerts out, with a real DriftMonitor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kllm.testing.drift_streams import NOISE, latency_responses, process_in_batches
from processors.base import Emit
from processors.drift import Alert, DriftMonitor, PromptReference
from processors.drift_signals import (
    DEFAULT_MODEL,
    DriftStage,
    EmbedBudget,
    feedback_features,
    to_message,
)
from schemas import (
    ChatTurn,
    Chunk,
    DriftAlert,
    FeedbackEnriched,
    InferenceJob,
    Message,
    Request,
    Response,
    RetrievalContext,
)
from tests.unit.conftest import FakeEmbedder
from topics import DRIFT_ALERTS


class Recorder(DriftMonitor):
    """A real DriftMonitor that also records every observation it is fed."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: list[tuple[str, str, str, float, str, float]] = []

    def update(self, obs: Any) -> list[Alert]:
        self.seen.append((obs.tenant, obs.model, obs.signal, obs.value, obs.request_id, obs.at))
        return super().update(obs)


@pytest.fixture
def stage(embedder: FakeEmbedder) -> DriftStage:
    return DriftStage(Recorder(warmup=20, cooldown=10), PromptReference(size=2), embedder.embed)


def seen(stage: DriftStage) -> list[tuple[str, str, str, float, str, float]]:
    assert isinstance(stage.monitor, Recorder)
    return stage.monitor.seen


def signals(stage: DriftStage) -> list[str]:
    return [s[2] for s in seen(stage)]


def request(i: int = 1, **kw: Any) -> Request:
    base: dict[str, Any] = {
        "request_id": f"q{i}",
        "tenant": "acme",
        "prompt": "what is kafka",
        "created_at": 1000.0 + i,
    }
    base.update(kw)
    return Request(**base)


def job(req: Request, scores: Sequence[float]) -> InferenceJob:
    chunks = [Chunk(chunk_id=f"c{i}", doc_id="d", text="t", score=s) for i, s in enumerate(scores)]
    return InferenceJob(
        request=req,
        context=RetrievalContext(request_id=req.request_id, chunks=chunks),
        messages=[ChatTurn(role="user", content="q")],
    )


def response(i: int = 1, **kw: Any) -> Response:
    base: dict[str, Any] = {
        "request_id": f"r{i}",
        "tenant": "acme",
        "text": "an answer",
        "verdict": "allowed",
        "model": "m",
        "finish_reason": "stop",
        "pipeline_ms": 250.0,
        "ttft_ms": 40.0,
    }
    base.update(kw)
    return Response(**base)


def enriched(i: int = 1, **kw: Any) -> FeedbackEnriched:
    base: dict[str, Any] = {
        "request_id": f"f{i}",
        "tenant": "acme",
        "status": "joined",
        "rating": 4,
        "feedback_at": 5000.0 + i,
        "model": "m",
        "prompt": "what is kafka",
        "answer": "a log",
        "verdict": "allowed",
        "top_score": 0.8,
        "pipeline_ms": 200.0,
        "injection_score": 0.1,
    }
    base.update(kw)
    return FeedbackEnriched(**base)


# -- requests ---------------------------------------------------------------------------


def test_request_yields_prompt_length_keyed_by_its_model(stage: DriftStage) -> None:
    assert stage.process_batch([request(1, prompt="abcdef", model="big")], now=9.0) == []
    assert seen(stage) == [("acme", "big", "prompt_length", 6.0, "q1", 1001.0)]


def test_request_without_model_is_keyed_default(stage: DriftStage) -> None:
    stage.process_batch([request(1)], now=9.0)
    assert DEFAULT_MODEL == "default"
    assert stage.monitor.streams() == [("acme", "default", "prompt_length")]


def test_prompt_distance_appears_once_the_reference_is_complete(stage: DriftStage) -> None:
    stage.process_batch([request(1), request(2)], now=9.0)  # reference size 2: learning
    assert signals(stage) == ["prompt_length", "prompt_length"]
    assert stage.reference.ready("acme", "default")

    stage.process_batch([request(3), request(4, prompt="totally different words here")], 9.0)
    distances = [(s[4], s[3]) for s in seen(stage) if s[2] == "prompt_distance"]
    assert [rid for rid, _ in distances] == ["q3", "q4"]
    assert distances[0][1] == pytest.approx(0.0, abs=1e-9)  # the same prompt as the reference
    assert distances[1][1] > 0.05
    assert ("acme", "default", "prompt_distance") in stage.monitor.streams()


def test_embed_is_called_once_per_batch_with_all_its_prompts(
    stage: DriftStage, embedder: FakeEmbedder
) -> None:
    batch: list[Message] = [
        request(1, prompt="first"),
        response(1),
        request(2, prompt="second"),
        enriched(1),
        request(3, prompt="third"),
    ]
    stage.process_batch(batch, now=9.0)
    assert embedder.calls == [["first", "second", "third"]]
    stage.process_batch([response(2), enriched(2)], now=10.0)
    assert embedder.calls == [["first", "second", "third"]]  # no request, no embedding


# -- inference jobs ---------------------------------------------------------------------


def test_job_yields_its_best_retrieval_score(stage: DriftStage) -> None:
    stage.process_batch([job(request(1, model="big"), [0.3, 0.85, 0.6])], now=9.0)
    assert seen(stage) == [("acme", "big", "retrieval_top_score", 0.85, "q1", 1001.0)]


def test_job_without_chunks_scores_zero(stage: DriftStage) -> None:
    stage.process_batch([job(request(1), [])], now=9.0)
    assert seen(stage) == [("acme", "default", "retrieval_top_score", 0.0, "q1", 1001.0)]


# -- responses --------------------------------------------------------------------------


def test_response_yields_latency_blocked_and_ttft_at_now(stage: DriftStage) -> None:
    stage.process_batch([response(1, verdict="blocked", model="served")], now=77.0)
    assert sorted(seen(stage)) == sorted(
        [
            ("acme", "served", "latency_ms", 250.0, "r1", 77.0),
            ("acme", "served", "blocked", 1.0, "r1", 77.0),
            ("acme", "served", "ttft_ms", 40.0, "r1", 77.0),
        ]
    )


def test_response_without_ttft_yields_no_ttft(stage: DriftStage) -> None:
    stage.process_batch([response(1, ttft_ms=None)], now=1.0)
    assert sorted(signals(stage)) == ["blocked", "latency_ms"]
    assert [s[3] for s in seen(stage) if s[2] == "blocked"] == [0.0]


@pytest.mark.parametrize(
    "kw", [{"cached": True}, {"error": "engine failed", "error_code": "engine_error"}]
)
def test_cached_or_failed_responses_yield_nothing(stage: DriftStage, kw: dict[str, Any]) -> None:
    assert stage.process_batch([response(1, **kw)], now=1.0) == []
    assert seen(stage) == []
    assert stage.monitor.streams() == []


# -- feedback ---------------------------------------------------------------------------


def test_joined_feedback_yields_its_score_and_trains_the_feedback_model(
    stage: DriftStage,
) -> None:
    assert stage.monitor.predict_negative("acme", "m", feedback_features(enriched())) == 0.5
    stage.process_batch([enriched(1, rating=1)], now=1.0)
    assert ("acme", "m", "feedback_score", 0.0, "f1", 5001.0) in seen(stage)
    assert set(stage.monitor.streams()) == {
        ("acme", "m", "feedback_score"),
        ("acme", "m", "feedback_model_error"),
    }
    # it learnt a negative label: the model's prediction moved off its prior
    assert stage.monitor.predict_negative("acme", "m", feedback_features(enriched())) != 0.5


def test_joined_feedback_without_model_is_keyed_default(stage: DriftStage) -> None:
    stage.process_batch([enriched(1, rating=5, model=None)], now=1.0)
    assert ("acme", "default", "feedback_score", 1.0, "f1", 5001.0) in seen(stage)
    assert ("acme", "default", "feedback_model_error") in stage.monitor.streams()


def test_orphan_feedback_yields_nothing(stage: DriftStage) -> None:
    orphan = enriched(1, status="orphan", reason="unknown request id", model=None)
    assert stage.process_batch([orphan], now=1.0) == []
    assert seen(stage) == []
    assert stage.monitor.streams() == []
    assert stage.monitor.predict_negative("acme", "default", feedback_features(orphan)) == 0.5


def test_feedback_features() -> None:
    f = feedback_features(enriched(verdict="blocked", cached=True))
    assert f == {
        "prompt_chars": pytest.approx(math.log1p(len("what is kafka"))),
        "answer_chars": pytest.approx(math.log1p(len("a log"))),
        "top_score": 0.8,
        "latency": pytest.approx(math.log1p(200.0)),
        "cached": 1.0,
        "redacted": 0.0,
        "blocked": 1.0,
        "injection": 0.1,
    }
    bare = feedback_features(
        FeedbackEnriched(request_id="x", tenant="t", status="joined", rating=3, feedback_at=1.0)
    )
    assert bare == {
        "prompt_chars": 0.0,
        "answer_chars": 0.0,
        "top_score": 0.0,
        "latency": 0.0,
        "cached": 0.0,
        "redacted": 0.0,
        "blocked": 0.0,
        "injection": 0.0,
    }


# -- alerts -----------------------------------------------------------------------------


def run_latency(
    stage: DriftStage, values: Callable[[int], float], start: int, end: int
) -> list[Emit]:
    return process_in_batches(stage, lambda lo: latency_responses(lo, values), start, end)


def test_latency_shift_raises_one_alert(stage: DriftStage) -> None:
    assert run_latency(stage, lambda i: NOISE[i % 10], 0, 60) == []  # warm-up, then stationary
    emits = run_latency(stage, lambda i: 10 * NOISE[i % 10], 60, 160)
    assert len(emits) == 1
    (emit,) = emits
    assert emit.topic == DRIFT_ALERTS
    assert emit.key == "acme/m"
    alert = emit.message
    assert isinstance(alert, DriftAlert)
    assert (alert.tenant, alert.model, alert.signal) == ("acme", "m", "latency_ms")
    assert alert.detector == "page_hinkley"
    assert alert.before["n"] == 20
    assert alert.before["mean"] == pytest.approx(sum(NOISE) / len(NOISE))
    assert alert.after["mean"] > 5 * alert.before["mean"]
    assert len(alert.sample_request_ids) == 5
    assert all(rid.startswith("r") and int(rid[1:]) >= 60 for rid in alert.sample_request_ids)
    assert alert.detected_at == 60.0  # the batch's ``now``: responses carry no time


def test_to_message_copies_the_alert() -> None:
    a = Alert(
        tenant="acme",
        model="m",
        signal="blocked",
        detector="adwin",
        before={"mean": 0.01, "std": 0.1, "n": 500.0},
        after={"mean": 0.3, "std": 0.4, "n": 40.0},
        sample_request_ids=("a", "b"),
        at=123.5,
        events_seen=900,
    )
    m = to_message(a)
    assert m == DriftAlert(
        tenant="acme",
        model="m",
        signal="blocked",
        detector="adwin",
        before={"mean": 0.01, "std": 0.1, "n": 500.0},
        after={"mean": 0.3, "std": 0.4, "n": 40.0},
        sample_request_ids=["a", "b"],
        detected_at=123.5,
    )


def test_embed_budget_grants_a_second_of_prompts_then_refills_with_time() -> None:
    budget = EmbedBudget(per_s=10)
    assert budget.take(25, now=100.0) == 10  # a full bucket: one second's worth
    assert budget.take(5, now=100.0) == 0
    assert budget.take(5, now=100.3) == 3  # 0.3 s refills three
    assert budget.take(50, now=200.0) == 10  # never more than a second's worth
    assert budget.take(2, now=205.0) == 2


def test_a_budgeted_stage_embeds_an_even_sample_of_a_burst(embedder: FakeEmbedder) -> None:
    budgeted = DriftStage(
        Recorder(warmup=20, cooldown=10), PromptReference(size=2), embedder.embed, EmbedBudget(4)
    )
    burst = [request(i, prompt=f"question {i}") for i in range(12)]
    budgeted.process_batch(burst, now=50.0)
    assert embedder.calls == [["question 0", "question 3", "question 6", "question 9"]]
    # Every prompt still counts for the length signal; only distances are sampled.
    assert signals(budgeted).count("prompt_length") == 12
    budgeted.process_batch([request(20, prompt="later")], now=50.5)
    assert embedder.calls[-1] == ["later"]
