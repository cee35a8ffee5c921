"""FeedbackJoin: the stateful join of request, job, response and feedback by request id."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from processors.base import Emit, Rejected
from processors.feedback import DEFAULT_TTL_S, FeedbackJoin
from schemas import (
    ChatTurn,
    Chunk,
    Feedback,
    FeedbackEnriched,
    FunctionCall,
    InferenceJob,
    Request,
    Response,
    RetrievalContext,
    ToolCall,
    Usage,
)
from tests.unit.conftest import FakeRedactor, FakeState
from topics import FEEDBACK_ENRICHED

RID = "req-1"
EMAIL = "jane@example.com"
PII = {EMAIL: "EMAIL_ADDRESS"}


def request(**kw: Any) -> Request:
    base: dict[str, Any] = {
        "request_id": RID,
        "tenant": "acme",
        "prompt": "What is <PERSON>'s Kafka setup?",
        "model": "asked-model",
        "template": "rag-v1",
        "pii": ["PERSON"],
        "injection_score": 0.12,
        "created_at": 1000.0,
    }
    base.update(kw)
    return Request(**base)


def job(req: Request | None = None, scores: Sequence[float] = (0.4, 0.9, 0.7)) -> InferenceJob:
    req = req or request()
    chunks = [
        Chunk(chunk_id=f"c{i}", doc_id=f"d{i}", text=f"passage {i}", score=s)
        for i, s in enumerate(scores)
    ]
    return InferenceJob(
        request=req,
        context=RetrievalContext(request_id=req.request_id, chunks=chunks),
        messages=[ChatTurn(role="user", content="q")],
    )


def response(**kw: Any) -> Response:
    base: dict[str, Any] = {
        "request_id": RID,
        "tenant": "acme",
        "text": "Kafka is a log [1].",
        "verdict": "redacted",
        "model": "served-model",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=42, completion_tokens=7),
        "engine_ms": 120.0,
        "ttft_ms": 15.0,
        "cost_usd": 0.0031,
        "pipeline_ms": 180.0,
        "template": "rag-v1-served",
        "policy": "policy-3",
    }
    base.update(kw)
    return Response(**base)


def feedback(**kw: Any) -> Feedback:
    base: dict[str, Any] = {
        "request_id": RID,
        "tenant": "acme",
        "rating": 2,
        "label": "wrong",
        "comment": "not what I asked",
        "created_at": 2000.0,
    }
    base.update(kw)
    return Feedback(**base)


def feed_all(join: FeedbackJoin, state: FakeState, req: Request | None = None) -> None:
    req = req or request()
    assert join.on_request(req, state) == []
    assert join.on_job(job(req), state) == []
    assert join.on_response(response(), state) == []


def single(emits: list[Emit]) -> FeedbackEnriched:
    assert len(emits) == 1
    (emit,) = emits
    assert emit.topic == FEEDBACK_ENRICHED
    assert isinstance(emit.message, FeedbackEnriched)
    assert emit.key == emit.message.request_id
    return emit.message


def test_full_join_copies_every_field() -> None:
    join, state = FeedbackJoin(), FakeState()
    feed_all(join, state)

    emits = join.on_feedback(feedback(), state)
    assert emits[0].key == RID
    r = single(emits)
    assert r.status == "joined"
    assert r.reason is None
    assert (r.request_id, r.tenant, r.rating, r.label) == (RID, "acme", 2, "wrong")
    assert r.comment == "not what I asked"
    assert r.feedback_at == 2000.0
    assert r.prompt == "What is <PERSON>'s Kafka setup?"
    assert r.answer == "Kafka is a log [1]."
    assert r.verdict == "redacted"
    assert r.finish_reason == "stop"
    assert r.model == "served-model"  # the model that answered wins over the one asked for
    assert r.template == "rag-v1-served"
    assert r.policy == "policy-3"
    assert r.cached is False
    assert r.chunk_ids == ["c0", "c1", "c2"]
    assert r.top_score == 0.9
    assert r.usage == Usage(prompt_tokens=42, completion_tokens=7)
    assert (r.pipeline_ms, r.engine_ms, r.ttft_ms) == (180.0, 120.0, 15.0)
    assert r.cost_usd == 0.0031
    assert r.prompt_pii == ["PERSON"]
    assert r.injection_score == 0.12
    assert r.requested_at == 1000.0
    assert (join.counts.joined, join.counts.orphans) == (1, 0)


def test_request_model_and_template_fill_in_when_the_response_has_none() -> None:
    join, state = FeedbackJoin(), FakeState()
    join.on_request(request(), state)
    join.on_response(response(model="", template=None), state)
    r = single(join.on_feedback(feedback(), state))
    assert r.model == "asked-model"
    assert r.template == "rag-v1"


def test_job_without_chunks_has_no_top_score() -> None:
    join, state = FeedbackJoin(), FakeState()
    join.on_request(request(), state)
    join.on_job(job(scores=()), state)
    join.on_response(response(), state)
    r = single(join.on_feedback(feedback(), state))
    assert r.status == "joined"
    assert r.chunk_ids == []
    assert r.top_score is None


def test_feedback_alone_is_an_orphan_with_a_reason() -> None:
    join, state = FeedbackJoin(), FakeState()
    emits = join.on_feedback(feedback(), state)
    r = single(emits)
    assert emits[0].key == RID
    assert r.status == "orphan"
    assert r.reason
    assert (r.rating, r.label, r.comment, r.feedback_at) == (2, "wrong", "not what I asked", 2000.0)
    assert r.prompt is None and r.answer is None and r.model is None and r.usage is None
    assert (join.counts.joined, join.counts.orphans) == (0, 1)


def test_feedback_before_the_records_arrive_is_an_orphan() -> None:
    join, state = FeedbackJoin(), FakeState()
    early = single(join.on_feedback(feedback(rating=1), state))
    feed_all(join, state)
    late = single(join.on_feedback(feedback(rating=4), state))
    assert early.status == "orphan"
    assert early.answer is None
    assert late.status == "joined"
    assert late.answer == "Kafka is a log [1]."
    assert (join.counts.joined, join.counts.orphans) == (1, 1)


def test_request_and_job_without_a_response_is_an_orphan() -> None:
    join, state = FeedbackJoin(), FakeState()
    join.on_request(request(), state)
    join.on_job(job(), state)
    r = single(join.on_feedback(feedback(), state))
    assert r.status == "orphan"
    assert r.prompt is None  # nothing joined on an orphan
    assert join.counts.orphans == 1


def test_only_the_response_known_joins_what_is_known() -> None:
    join, state = FeedbackJoin(), FakeState()
    join.on_response(response(), state)
    r = single(join.on_feedback(feedback(), state))
    assert r.status == "joined"
    assert r.answer == "Kafka is a log [1]."
    assert r.model == "served-model"
    assert r.usage == Usage(prompt_tokens=42, completion_tokens=7)
    assert r.prompt is None
    assert r.chunk_ids == []
    assert r.top_score is None
    assert r.prompt_pii == []
    assert r.injection_score is None
    assert r.requested_at is None
    assert join.counts.joined == 1


def test_feedback_from_another_tenant_is_rejected_silently() -> None:
    join, state = FeedbackJoin(), FakeState()
    feed_all(join, state)
    with pytest.raises(Rejected) as info:
        join.on_feedback(feedback(tenant="intruder"), state)
    assert info.value.notify is False
    assert info.value.code == "invalid_request"
    assert "intruder" in info.value.reason
    assert (join.counts.joined, join.counts.orphans) == (0, 0)
    # the owner's feedback still joins afterwards
    assert single(join.on_feedback(feedback(), state)).status == "joined"


def test_comment_is_redacted_through_the_redactor() -> None:
    redactor = FakeRedactor(PII)
    join, state = FeedbackJoin(redactor=redactor), FakeState()
    feed_all(join, state)
    comment = f"mail me at {EMAIL}"
    joined = single(join.on_feedback(feedback(comment=comment), state))
    orphan = single(join.on_feedback(feedback(request_id="other", comment=comment), FakeState()))
    assert joined.comment == "mail me at <EMAIL_ADDRESS>"
    assert orphan.comment == "mail me at <EMAIL_ADDRESS>"
    assert redactor.calls == [comment, comment]


def test_no_comment_does_not_call_the_redactor() -> None:
    redactor = FakeRedactor(PII)
    join = FeedbackJoin(redactor=redactor)
    r = single(join.on_feedback(feedback(comment=None), FakeState()))
    assert r.comment is None
    assert redactor.calls == []


def test_comment_kept_as_is_without_a_redactor() -> None:
    join, state = FeedbackJoin(), FakeState()
    feed_all(join, state)
    comment = f"mail me at {EMAIL}"
    assert single(join.on_feedback(feedback(comment=comment), state)).comment == comment


def test_two_feedbacks_on_one_request_give_two_records() -> None:
    join, state = FeedbackJoin(), FakeState()
    feed_all(join, state)
    first = single(join.on_feedback(feedback(rating=1, created_at=2000.0), state))
    second = single(join.on_feedback(feedback(rating=5, created_at=2100.0), state))
    assert (first.rating, first.feedback_at) == (1, 2000.0)
    assert (second.rating, second.feedback_at) == (5, 2100.0)
    assert first.status == second.status == "joined"
    assert join.counts.joined == 2


def test_state_is_written_with_the_configured_ttl() -> None:
    join, state = FeedbackJoin(ttl_s=60.0), FakeState()
    feed_all(join, state)
    assert set(state.ttls) == {"request", "retrieval", "response"}
    assert all(ttl == timedelta(seconds=60) for ttl in state.ttls.values())


def test_default_ttl_is_a_week() -> None:
    state = FakeState()
    feed_all(FeedbackJoin(), state)
    assert DEFAULT_TTL_S == 7 * 24 * 3600
    assert all(ttl == timedelta(days=7) for ttl in state.ttls.values())


def test_feedback_after_the_ttl_is_an_orphan() -> None:
    join, state = FeedbackJoin(ttl_s=60.0), FakeState()
    feed_all(join, state)
    state.now = 30.0
    assert single(join.on_feedback(feedback(), state)).status == "joined"
    state.now = 90.0
    late = single(join.on_feedback(feedback(), state))
    assert late.status == "orphan"
    assert late.reason and "TTL" in late.reason
    assert (join.counts.joined, join.counts.orphans) == (1, 1)


def test_the_join_carries_the_whole_conversation_and_the_tool_calls() -> None:
    turns = [
        ChatTurn(role="system", content="Be brief."),
        ChatTurn(role="user", content="What is Kafka?"),
        ChatTurn(role="assistant", content="A log."),
        ChatTurn(role="user", content="And a partition?"),
    ]
    call = ToolCall(id="c1", function=FunctionCall(name="lookup", arguments='{"q": "p"}'))
    join, state = FeedbackJoin(), FakeState()
    req = Request(request_id=RID, tenant="acme", messages=turns)
    join.on_request(req, state)
    join.on_job(job(req), state)
    join.on_response(response(tool_calls=[call], finish_reason="tool_calls"), state)
    r = single(join.on_feedback(feedback(), state))
    assert r.messages == turns
    assert r.prompt == "And a partition?"
    assert r.tool_calls == [call]
