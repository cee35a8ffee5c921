"""Shadow answers and the shadow report: the candidate's copy of a job, where its
answer goes, and the paired comparison with the live answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from kllm.core.errors import ConfigError
from kllm.runtime.dispatch import RecordRef
from processors.base import Outcome
from processors.online_eval import OnlineEvaluator
from processors.shadow import Shadow
from processors.shadow_report import pairs, report
from schemas import Evaluation, Generation, InferenceJob, encode
from services.shadow import Settings, build, handler
from tests.unit.conftest import FakeEmbedder, FakeEngine
from topics import GENERATIONS_SHADOW, INFERENCE

MakeJob = Callable[..., InferenceJob]


def _shadow(sample: float = 1.0, **kw: object) -> tuple[Shadow, FakeEngine]:
    engine = FakeEngine(model="cand", pieces=["Kafka is a log [1]."])
    settings = Settings(models=[{"name": "cand"}], shadow_model="cand", shadow_sample=sample, **kw)  # type: ignore[list-item,arg-type]
    shadow, _ = build(settings, engines={"cand": engine})
    return shadow, engine


def test_the_candidate_copy_has_its_model_no_stream_no_deadline(
    make_job: MakeJob, make_request: Callable[..., object]
) -> None:
    job = make_job(make_request(stream=True, deadline_at=5.0, model="live", template="rag@v2/a"))
    shadow, _ = _shadow()
    copy = shadow.candidate(job)
    assert (copy.request.model, copy.request.stream, copy.request.deadline_at) == (
        "cand",
        False,
        None,
    )
    assert copy.request.template == "rag@v2/a" and copy.messages == job.messages
    assert job.request.model == "live"  # the live job is untouched


def test_a_candidate_template_replaces_the_system_prompt(make_job: MakeJob) -> None:
    shadow, _ = _shadow(shadow_template="rag@v2/b")
    copy = shadow.candidate(make_job())
    assert copy.request.template == "rag@v2/b"
    assert copy.messages[0].role == "system" and copy.messages[0].content != "sys"
    assert copy.messages[1:] == make_job().messages[1:]


def test_the_answer_goes_to_the_shadow_topic_only(make_job: MakeJob) -> None:
    shadow, engine = _shadow()
    out = asyncio.run(shadow.answer(make_job()))
    assert [e.topic for e in out] == [GENERATIONS_SHADOW]
    gen = out[0].message
    assert isinstance(gen, Generation) and gen.model == "cand" and gen.text == engine.text
    assert out[0].key == "req-1"


def test_sampling_draws_as_the_evaluation_stage(
    make_job: MakeJob, make_request: Callable[..., object]
) -> None:
    shadow, _ = _shadow(sample=0.3)
    evaluator = OnlineEvaluator(FakeEmbedder(), sample=0.3)
    jobs = [make_job(make_request(request_id=f"r{i}")) for i in range(300)]
    assert [shadow.sampled(j) for j in jobs] == [
        evaluator.sampled(j.request.request_id, "acme") for j in jobs
    ]
    skipped = next(j for j in jobs if not shadow.sampled(j))
    assert asyncio.run(shadow.answer(skipped)) == []


def test_build_refuses_an_unknown_model_or_template() -> None:
    with pytest.raises(ConfigError, match="not in KLLM_MODELS"):
        build(Settings(models=[{"name": "a"}], shadow_model="b"))  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="shadow template"):
        _shadow(shadow_template="rag@v99/a")


def test_the_worker_skips_what_it_cannot_read(make_job: MakeJob) -> None:
    shadow, _ = _shadow()
    handle = handler(shadow)
    ref = RecordRef(INFERENCE, 0, 7, "req-1")
    assert asyncio.run(handle(ref, b"not json", lambda _e: None)) == []
    out = asyncio.run(handle(ref, encode(make_job()), lambda _e: None))
    assert [e.topic for e in out] == [GENERATIONS_SHADOW]


def _ev(rid: str, source: str, g: float, latency: float, model: str = "m") -> Evaluation:
    return Evaluation(
        request_id=rid, tenant="t", model=model, source=source, groundedness=g,  # type: ignore[arg-type]
        unsupported=g < 0.5, claims=2, latency_ms=latency, completion_tokens=10,
    )  # fmt: skip


def test_pairs_keep_requests_with_both_sides_and_the_latest_of_each() -> None:
    evs = [
        _ev("a", "primary", 0.2, 100),
        _ev("a", "shadow", 0.4, 90, "cand"),
        _ev("a", "shadow", 0.9, 80, "cand"),  # a replay again: the latest counts
        _ev("b", "primary", 0.5, 100),  # no shadow answer
        _ev("c", "shadow", 1.0, 50, "cand"),  # no live evaluation
        _ev("d", "shadow", 1.0, 50, "other"),
        _ev("d", "primary", 0.0, 50),
    ]
    found = pairs(evs, "cand")
    assert [(p.primary.request_id, p.shadow.groundedness) for p in found] == [("a", 0.9)]
    assert {p.primary.request_id for p in pairs(evs)} == {"a", "d"}


def test_report_gives_deltas_intervals_and_win_rates() -> None:
    evs = []
    for i in range(40):
        evs.append(_ev(f"r{i}", "primary", 0.4 + 0.01 * (i % 5), 200 + i))
        evs.append(_ev(f"r{i}", "shadow", 0.6 + 0.01 * (i % 3), 100 + i, "cand"))
    rows = {r.metric: r for r in report(pairs(evs))}
    g = rows["groundedness"]
    assert g.pairs == 40 and g.primary_model == "m" and g.shadow_model == "cand"
    assert g.delta is not None and g.low is not None and g.high is not None
    assert 0.15 < g.low <= g.delta <= g.high < 0.25
    assert g.win_rate == 1.0
    lat = rows["latency_ms"]
    assert lat.delta == pytest.approx(-100.0) and lat.win_rate == 1.0  # faster wins
    assert rows["unsupported"].win_rate == 1.0  # fewer unsupported wins
    assert rows["completion_tokens"].win_rate is None  # no winner on tokens
    assert rows["citation_validity"].pairs == 0 and rows["citation_validity"].delta is None


def test_the_worker_skips_a_job_the_candidate_fails_on(make_job: MakeJob) -> None:
    async def broken(_job: InferenceJob) -> Outcome:
        raise RuntimeError("a bug in the candidate's engine")

    handle = handler(Shadow(broken, "cand"))
    ref = RecordRef(INFERENCE, 0, 8, "req-1")
    assert asyncio.run(handle(ref, encode(make_job()), lambda _e: None)) == []
