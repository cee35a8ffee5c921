"""Online evaluation: sampling, scores, and where they go (drift, metrics, dashboard)."""

from __future__ import annotations

import pytest

from kllm.gateway.monitor import PipelineMonitor
from kllm.runtime.metrics import StageMetrics
from processors.base import Emit
from processors.drift import SIGNALS, DriftMonitor, PromptReference
from processors.drift_signals import DriftStage
from processors.online_eval import OnlineEvaluator
from schemas import Chunk, Evaluation, Generation, Request, Usage, encode
from services.evaluation import Settings, build
from tests.unit.conftest import FakeEmbedder
from topics import EVALUATION_GROUP, EVALUATIONS, GENERATIONS, GENERATIONS_SHADOW, stage_groups

PASSAGE = "Each stage is a separate Python process. Stages talk only through Kafka topics."


def _generation(
    rid: str, text: str, *, tenant: str = "acme", error: str | None = None
) -> Generation:
    return Generation(
        request=Request(
            request_id=rid, tenant=tenant, prompt="How are stages run?", template="rag@v2/a"
        ),
        chunks=[Chunk(chunk_id="c1", doc_id="architecture", text=PASSAGE, score=0.7)],
        text=text,
        model="smollm2-135m",
        finish_reason="stop",
        usage=Usage(prompt_tokens=50, completion_tokens=9),
        latency_ms=120.0,
        error=error,
    )


def _evaluation(out: list[Emit]) -> Evaluation:
    assert [e.topic for e in out] == [EVALUATIONS]
    message = out[0].message
    assert isinstance(message, Evaluation)
    return message


def test_a_supported_cited_answer_scores_grounded_and_valid() -> None:
    ev = _evaluation(
        OnlineEvaluator(FakeEmbedder(), sample=1.0).process(
            _generation("r1", "Each stage is a separate Python process [1].")
        )
    )
    assert (ev.groundedness, ev.unsupported, ev.citation_validity) == (1.0, False, 1.0)
    assert (ev.tenant, ev.model, ev.template, ev.source) == (
        "acme",
        "smollm2-135m",
        "rag@v2/a",
        "primary",
    )
    assert (ev.prompt_tokens, ev.completion_tokens, ev.latency_ms, ev.passages) == (50, 9, 120.0, 1)
    assert ev.relevance is not None and -1.0 <= ev.relevance <= 1.0


def test_an_invented_answer_is_unsupported_and_a_wrong_citation_invalid() -> None:
    ev = _evaluation(
        OnlineEvaluator(FakeEmbedder(), sample=1.0).process(
            _generation("r2", "You run karl-python from the Klombra toolkit [3].")
        )
    )
    assert (ev.groundedness, ev.unsupported, ev.citation_validity) == (0.0, True, 0.0)


def test_declines_and_engine_errors_carry_no_groundedness() -> None:
    evaluator = OnlineEvaluator(FakeEmbedder(), sample=1.0)
    declined = evaluator.evaluate(_generation("r3", "The context does not say."))
    assert (declined.declined, declined.groundedness, declined.unsupported) == (True, None, False)
    failed = evaluator.evaluate(_generation("r4", "", error="engine down"))
    assert (failed.error, failed.groundedness, failed.claims) == ("engine down", None, 0)


def test_sampling_is_fixed_by_request_id_and_per_tenant() -> None:
    evaluator = OnlineEvaluator(FakeEmbedder(), sample=0.2, per_tenant={"all": 1.0, "none": 0.0})
    ids = [f"req-{i}" for i in range(2000)]
    share = sum(evaluator.sampled(r, "acme") for r in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [evaluator.sampled(r, "acme") for r in ids] == [
        OnlineEvaluator(FakeEmbedder(), sample=0.2).sampled(r, "acme") for r in ids
    ]
    assert all(evaluator.sampled(r, "all") for r in ids[:100])
    assert not any(evaluator.sampled(r, "none") for r in ids[:100])
    skipped = next(r for r in ids if not evaluator.sampled(r, "acme"))
    assert evaluator.process(_generation(skipped, "Anything.")) == []


def test_sample_rates_outside_0_1_are_refused() -> None:
    with pytest.raises(ValueError, match="sample rates"):
        OnlineEvaluator(FakeEmbedder(), per_tenant={"acme": 1.5})


def test_the_stage_reads_generations_in_its_own_group_as_a_side_reader() -> None:
    (source, logic), (shadows, of_shadows) = build(
        Settings(eval_sample=0.0), embedder=FakeEmbedder()
    )
    assert (source, shadows) == (GENERATIONS, GENERATIONS_SHADOW)
    assert logic.owner is False and of_shadows.owner is False
    shadow_answer = _generation("r6", "Each stage is a separate Python process.")
    assert logic.process(shadow_answer) == []  # live answers: none sampled at 0
    assert _evaluation(of_shadows.process(shadow_answer)).source == "shadow"  # every shadow one
    assert stage_groups("evaluation") == (EVALUATION_GROUP,)
    out = of_shadows.process(_generation("r5", "Each stage is a separate Python process."))
    assert _evaluation(out).groundedness == 1.0


def _scored(rid: str, groundedness: float, model: str = "m") -> Evaluation:
    return Evaluation(
        request_id=rid,
        tenant="acme",
        model=model,
        template="rag@v2/a",
        groundedness=groundedness,
        unsupported=groundedness < 0.5,
        claims=2,
        evaluated_at=1_000.0,
    )


def test_drift_alerts_when_groundedness_falls() -> None:
    assert "groundedness" in SIGNALS
    stage = DriftStage(
        DriftMonitor(warmup=50, cooldown=0), PromptReference(10), FakeEmbedder().embed
    )
    alerts = stage.process_batch([_scored(f"a{i}", 0.9 + 0.1 * (i % 2)) for i in range(300)], 0.0)
    assert alerts == []
    alerts = stage.process_batch([_scored(f"b{i}", 0.1 * (i % 2)) for i in range(300)], 0.0)
    assert [a.message.signal for a in alerts] == ["groundedness"]  # type: ignore[attr-defined]
    assert alerts[0].key == "acme/m"


def test_metrics_count_outcomes_and_observe_groundedness() -> None:
    metrics = StageMetrics("evaluation")
    emits = [Emit(EVALUATIONS, "r", _scored("r1", 1.0)), Emit(EVALUATIONS, "r", _scored("r2", 0.0))]
    metrics.observe(GENERATIONS.name, 2, emits, 0.01)
    labels = {"tenant": "acme", "model": "m", "template": "rag@v2/a", "source": "primary"}
    get = metrics.registry.get_sample_value
    assert get("kllm_answers_evaluated_total", {**labels, "outcome": "supported"}) == 1.0
    assert get("kllm_answers_evaluated_total", {**labels, "outcome": "unsupported"}) == 1.0
    assert get("kllm_answer_groundedness_count", labels) == 2.0


def test_dashboard_shows_groundedness_p50_and_unsupported_rate_per_row() -> None:
    monitor = PipelineMonitor("unused:9092")  # not started: records are fed by hand
    for i, g in enumerate([1.0, 1.0, 0.0, 0.5]):
        monitor._record(EVALUATIONS.name, b"k", encode(_scored(f"r{i}", g)), 1_000.0)
    monitor._record(EVALUATIONS.name, b"k", b"not json", 1_000.0)  # skipped, not fatal
    (row,) = monitor.data()["quality"]
    assert row["model"] == "m" and row["evaluated"] == 4
    assert row["groundedness_p50"] == 1.0
    assert row["unsupported_rate"] == 0.25


def test_drift_ignores_shadow_answers() -> None:
    stage = DriftStage(
        DriftMonitor(warmup=50, cooldown=0), PromptReference(10), FakeEmbedder().embed
    )
    shadow = [_scored(f"s{i}", 0.9).model_copy(update={"source": "shadow"}) for i in range(60)]
    stage.process_batch(shadow, 0.0)
    assert stage.monitor.streams() == []  # a candidate's scores are not the live model's


def test_drift_does_not_alert_when_groundedness_rises() -> None:
    stage = DriftStage(
        DriftMonitor(warmup=50, cooldown=0), PromptReference(10), FakeEmbedder().embed
    )
    stage.process_batch([_scored(f"a{i}", 0.1 * (i % 2)) for i in range(300)], 0.0)
    alerts = stage.process_batch([_scored(f"b{i}", 0.9 + 0.1 * (i % 2)) for i in range(300)], 0.0)
    assert alerts == []
