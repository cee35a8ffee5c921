from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from processors.moderation import BLOCKED_TEXT, Moderator
from schemas import Generation, ModerationEvent, Response
from schemas.messages import Citation
from topics import MODERATION_EVENTS, RESPONSES

MakeGen = Callable[..., Generation]
NOW = 1000.5  # make_request() sets created_at=1000.0


def _split(out: list[Any], gen: Generation) -> tuple[Response, ModerationEvent]:
    assert [e.topic for e in out] == [RESPONSES, MODERATION_EVENTS]
    assert all(e.key == gen.request.request_id for e in out)
    response, event = out[0].message, out[1].message
    assert isinstance(response, Response)
    assert isinstance(event, ModerationEvent)
    return response, event


def test_below_threshold_allowed(
    classifier_factory: Callable[..., Any], make_generation: MakeGen
) -> None:
    clf = classifier_factory(default=0.3)
    gen = make_generation()
    response, event = _split(Moderator(clf, block_threshold=0.8).process(gen, now=NOW), gen)
    assert clf.calls == [[gen.text]]
    assert response.verdict == "allowed"
    assert response.text == gen.text
    assert response.finish_reason == "stop"
    assert response.reasons == []
    assert response.request_id == gen.request.request_id
    assert response.tenant == "acme"
    assert response.model == gen.model
    assert response.usage == gen.usage
    assert response.engine_ms == gen.latency_ms
    assert response.pipeline_ms == pytest.approx(500.0)
    assert response.error is None
    assert response.citations == [
        Citation(chunk_id=c.chunk_id, doc_id=c.doc_id, score=c.score) for c in gen.chunks
    ]
    assert event.verdict == "allowed"
    assert event.scores == {"fake-clf": 0.3}
    assert event.reasons == []
    assert (event.request_id, event.tenant) == (gen.request.request_id, "acme")


@pytest.mark.parametrize("score", [0.8, 0.95, 1.0])
def test_at_or_above_threshold_blocked(
    classifier_factory: Callable[..., Any], make_generation: MakeGen, score: float
) -> None:
    clf = classifier_factory(default=score)
    gen = make_generation(text="something nasty")
    response, event = _split(Moderator(clf, block_threshold=0.8).process(gen, now=NOW), gen)
    assert response.verdict == "blocked"
    assert response.text == BLOCKED_TEXT
    assert "nasty" not in response.text
    assert response.finish_reason == "content_filter"
    assert response.reasons == [f"fake-clf score {score:.2f} >= 0.8"]
    assert event.verdict == "blocked"
    assert event.scores == {"fake-clf": score}
    assert event.reasons == response.reasons


def test_just_below_threshold_allowed(
    classifier_factory: Callable[..., Any], make_generation: MakeGen
) -> None:
    clf = classifier_factory(default=0.7999)
    gen = make_generation()
    response, _ = _split(Moderator(clf, block_threshold=0.8).process(gen, now=NOW), gen)
    assert response.verdict == "allowed"


def test_empty_text_not_scored(
    classifier_factory: Callable[..., Any], make_generation: MakeGen
) -> None:
    clf = classifier_factory(default=1.0)
    gen = make_generation(text="", finish_reason="error", error="engine error: boom")
    response, event = _split(Moderator(clf).process(gen, now=NOW), gen)
    assert clf.calls == []
    assert event.scores == {}
    assert event.verdict == response.verdict == "allowed"
    assert response.text == ""
    assert response.finish_reason == "error"
    assert response.error == "engine error: boom"


def test_pipeline_ms_never_negative(
    classifier_factory: Callable[..., Any], make_generation: MakeGen
) -> None:
    gen = make_generation()
    response, _ = _split(Moderator(classifier_factory()).process(gen, now=0.0), gen)
    assert response.pipeline_ms == 0.0


@pytest.mark.parametrize(("ttft_ms", "cost_usd"), [(4.5, 0.003), (None, 0.0)])
def test_ttft_and_cost_copied_into_response(
    classifier_factory: Callable[..., Any],
    make_generation: MakeGen,
    ttft_ms: float | None,
    cost_usd: float,
) -> None:
    gen = make_generation(ttft_ms=ttft_ms, cost_usd=cost_usd)
    response, _ = _split(Moderator(classifier_factory()).process(gen, now=NOW), gen)
    assert response.ttft_ms == ttft_ms
    assert response.cost_usd == cost_usd
