from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from kllm.core.errors import PipelineError
from schemas import (
    Chunk,
    DeadLetter,
    Document,
    DocumentIndexed,
    DriftAlert,
    EmbeddingRequest,
    Embeddings,
    Evaluation,
    Feedback,
    FeedbackEnriched,
    Generation,
    InferenceJob,
    Message,
    ModerationEvent,
    Request,
    Response,
    RetrievalContext,
    SchemaError,
    TokenDelta,
    Usage,
    decode,
    encode,
    peek_request_id,
    registry,
)
from schemas.chat import ChatTurn
from schemas.messages import Citation

_REQ = Request(
    request_id="r-1",
    tenant="acme",
    prompt="What is Kafka?",
    model="m",
    max_tokens=64,
    stream=True,
    created_at=1700000000.125,
    deadline_at=1700000030.5,
    metadata={"ui": "cli"},
)
_CHUNK = Chunk(chunk_id="c1", doc_id="d1", text="Kafka is a log.", score=0.875, source="a.md")
_CTX = RetrievalContext(request_id="r-1", chunks=[_CHUNK], embed_ms=1.5, search_ms=0.25)

SAMPLES: dict[type[Message], Message] = {
    Request: _REQ,
    RetrievalContext: _CTX,
    InferenceJob: InferenceJob(
        request=_REQ,
        context=_CTX,
        messages=[ChatTurn(role="system", content="s"), ChatTurn(role="user", content="u")],
    ),
    Generation: Generation(
        request=_REQ,
        chunks=[_CHUNK],
        text="answer",
        model="m",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=4),
        latency_ms=12.0,
        ttft_ms=2.0,
        cost_usd=0.003,
        attempts=2,
    ),
    Response: Response(
        request_id="r-1",
        tenant="acme",
        text="answer",
        verdict="redacted",
        reasons=["x"],
        model="m",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=4),
        citations=[Citation(chunk_id="c1", doc_id="d1", score=0.5)],
        engine_ms=1.0,
        ttft_ms=0.5,
        cost_usd=0.25,
        pipeline_ms=2.0,
        error=None,
    ),
    ModerationEvent: ModerationEvent(
        request_id="r-1", tenant="acme", verdict="blocked", scores={"p": 0.9}, reasons=["p"]
    ),
    Feedback: Feedback(request_id="r-1", rating=4, label="good", comment="ok", created_at=5.0),
    TokenDelta: TokenDelta(request_id="r-1", index=3, text=" log", model="m"),
    DriftAlert: DriftAlert(
        tenant="acme",
        model="m",
        signal="rating",
        detector="adwin",
        before={"mean": 4.0},
        after={"mean": 2.0},
        sample_request_ids=["r-1", "r-2"],
        detected_at=7.0,
    ),
    Evaluation: Evaluation(
        request_id="r-1",
        tenant="acme",
        model="m",
        template="rag@v2/a",
        groundedness=0.5,
        unsupported=False,
        claims=2,
        citation_validity=1.0,
        relevance=0.6,
        passages=3,
        evaluated_at=7.0,
    ),
    DeadLetter: DeadLetter(
        stage="ingestion",
        reason="bad",
        source_topic="t",
        partition=1,
        offset=2,
        key="k",
        request_id="r-1",
        payload_b64="AAE=",
        failed_at=9.0,
    ),
    Document: Document(
        tenant="acme",
        doc_id="guides/kafka",
        op="upsert",
        text="Kafka is a log. Topics have partitions.",
        source="kafka.md",
        version=3,
        metadata={"lang": "en"},
        created_at=11.0,
    ),
    EmbeddingRequest: EmbeddingRequest(request_id="e-1", tenant="acme", inputs=["a", "b c"]),
    Embeddings: Embeddings(
        request_id="e-1", tenant="acme", model="m", vectors_b64=["AAAAPwAAgL8="], prompt_tokens=1
    ),
    DocumentIndexed: DocumentIndexed(
        tenant="acme", doc_id="guides/kafka", version=3, op="skipped", chunks=0, reason="older"
    ),
    FeedbackEnriched: FeedbackEnriched(
        request_id="r-1",
        tenant="acme",
        status="joined",
        rating=2,
        label="wrong",
        comment="Call <PHONE_NUMBER>",
        feedback_at=12.0,
        model="m",
        prompt="What is a DLQ?",
        answer="A queue.",
        verdict="allowed",
        chunk_ids=["c-1"],
        top_score=0.7,
        usage=Usage(prompt_tokens=3, completion_tokens=4),
    ),
}


def _body(message: Message, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(encode(message))
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k)
        else:
            body[k] = v
    return body


_DROP = object()


def _reason(data: bytes | str, expected: type[Message] = Request) -> str:
    with pytest.raises(SchemaError) as info:
        decode(data, expected)
    return info.value.reason


CURRENT = sorted(key for key, model in registry.items() if key[1] == model.VERSION)


def test_every_registered_schema_has_a_sample() -> None:
    assert set(SAMPLES) == set(registry.values())
    assert len(CURRENT) == len(SAMPLES)  # no (schema, version) key shadows another


@pytest.mark.parametrize("key", CURRENT, ids=lambda k: f"{k[0]}-v{k[1]}")
def test_round_trip(key: tuple[str, int]) -> None:
    model = registry[key]
    original = SAMPLES[model]
    data = encode(original)
    assert isinstance(data, bytes)
    body = orjson.loads(data)
    assert (body["schema"], body["v"]) == key
    decoded = decode(data, model)
    assert type(decoded) is model
    assert decoded == original
    # str input is accepted too, and encoding is stable
    assert decode(data.decode(), model) == original
    assert encode(decoded) == data


def test_defaults_survive_round_trip() -> None:
    r = Request(request_id="x", prompt="p")
    assert decode(encode(r), Request) == r
    assert r.tenant == "default"
    assert r.created_at > 0


def test_unknown_version_names_version_and_supported() -> None:
    reason = _reason(orjson.dumps(_body(_REQ, v=7)))
    assert "unknown schema version 7" in reason
    assert "'llm.request'" in reason
    assert "supported: [1, 2]" in reason


def test_a_version_1_record_is_read_as_one_user_turn() -> None:
    v1 = {"schema": "llm.request", "v": 1, "request_id": "r-9", "prompt": "What is Kafka?"}
    request = decode(orjson.dumps(v1), Request)
    assert request.messages == [ChatTurn(role="user", content="What is Kafka?")]
    assert request.prompt == "What is Kafka?"
    assert orjson.loads(encode(request))["v"] == 2  # passed on as the current version


def test_prompt_and_messages_together_are_refused() -> None:
    body = _body(_REQ, prompt="also this")
    assert "either 'prompt'" in _reason(orjson.dumps(body))


def test_a_conversation_without_a_user_question_is_refused() -> None:
    body = _body(_REQ, messages=[{"role": "system", "content": "be brief"}])
    assert "needs a user turn with text" in _reason(orjson.dumps(body))


def test_the_prompt_is_the_latest_user_turn_with_text() -> None:
    turns = [
        ChatTurn(role="user", content="first"),
        ChatTurn(role="assistant", content="answer"),
        ChatTurn(role="user", content="second"),
        ChatTurn(role="user", content="  "),
    ]
    assert Request(request_id="x", messages=turns).prompt == "second"


def test_missing_field() -> None:
    assert _reason(orjson.dumps(_body(_REQ, messages=_DROP))) == "missing field 'messages'"


def test_a_version_1_request_without_its_prompt_names_the_prompt() -> None:
    v1 = {"schema": "llm.request", "v": 1, "request_id": "r", "tenant": "t"}
    assert _reason(orjson.dumps(v1)) == "missing field 'prompt'"
    assert decode(orjson.dumps(v1 | {"prompt": "hi"}), Request).prompt == "hi"


def test_missing_nested_field_is_dotted() -> None:
    body = _body(SAMPLES[InferenceJob])
    del body["request"]["messages"]
    reason = _reason(orjson.dumps(body), InferenceJob)
    assert reason == "missing field 'request.messages'"


def test_several_problems_are_all_reported() -> None:
    reason = _reason(orjson.dumps(_body(_REQ, messages=_DROP, request_id=_DROP)))
    assert "missing field 'messages'" in reason
    assert "missing field 'request_id'" in reason


def test_unknown_field() -> None:
    assert _reason(orjson.dumps(_body(_REQ, colour="red"))) == "unknown field 'colour'"


def test_invalid_field_value() -> None:
    reason = _reason(orjson.dumps(_body(_REQ, max_tokens=0)))
    assert reason.startswith("field 'max_tokens': ")
    assert "greater than or equal to 1" in reason


def test_wrong_schema_name() -> None:
    reason = _reason(encode(SAMPLES[Response]), Request)
    assert reason == "expected schema 'llm.request', got 'llm.response'"


def test_missing_schema_name() -> None:
    assert _reason(orjson.dumps(_body(_REQ, schema=_DROP))) == "missing field 'schema'"


@pytest.mark.parametrize("data", [b"not json", b"{", b"\xff\xfe", b"", "{'a': 1}"])
def test_non_json(data: bytes | str) -> None:
    assert _reason(data).startswith("payload is not valid JSON")


@pytest.mark.parametrize(
    ("data", "kind"), [(b"[1, 2]", "list"), (b'"x"', "str"), (b"3", "int"), (b"null", "NoneType")]
)
def test_json_not_an_object(data: bytes, kind: str) -> None:
    assert _reason(data) == f"payload must be a JSON object, got {kind}"


@pytest.mark.parametrize(
    ("v", "shown"), [(_DROP, "None"), (True, "True"), (False, "False"), ("1", "'1'"), (1.0, "1.0")]
)
def test_version_missing_or_not_an_int(v: object, shown: str) -> None:
    reason = _reason(orjson.dumps(_body(_REQ, v=v)))
    assert reason.startswith("missing or non-integer field 'v'")
    assert reason.endswith(f"got {shown}")


def test_schema_error_is_a_pipeline_error_with_reason() -> None:
    err = SchemaError("because")
    assert isinstance(err, PipelineError)
    assert err.reason == "because"
    assert str(err) == "because"


def test_messages_are_frozen_and_strict() -> None:
    with pytest.raises(ValidationError):
        _REQ.prompt = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Request(request_id="x", prompt="p", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Request(request_id="", prompt="p")
    with pytest.raises(ValidationError):
        Feedback(request_id="x", rating=6)


# --- peek_request_id ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "model", [Request, RetrievalContext, Response, ModerationEvent, Feedback, TokenDelta]
)
def test_peek_top_level(model: type[Message]) -> None:
    assert peek_request_id(encode(SAMPLES[model])) == "r-1"


@pytest.mark.parametrize("model", [InferenceJob, Generation])
def test_peek_nested(model: type[Message]) -> None:
    data = encode(SAMPLES[model])
    assert "request_id" not in orjson.loads(data)  # it really is only the nested one
    assert peek_request_id(data) == "r-1"
    assert peek_request_id(data.decode()) == "r-1"


def test_peek_reads_invalid_messages() -> None:
    # The point of peeking: the id is readable even when decoding fails.
    data = orjson.dumps(_body(_REQ, v=99, messages=_DROP))
    with pytest.raises(SchemaError):
        decode(data, Request)
    assert peek_request_id(data) == "r-1"


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        "",
        b"garbage",
        b"\xff\xfe",
        b"[1, 2]",
        b'"r-1"',
        b"{}",
        b'{"request_id": 5}',
        b'{"request_id": null}',
        b'{"request_id": ["r-1"]}',
        b'{"request": "r-1"}',
        b'{"request": {"request_id": 5}}',
        b'{"request": {}}',
    ],
)
def test_peek_garbage_is_none(data: bytes | str | None) -> None:
    assert peek_request_id(data) is None


def test_token_delta_index_is_never_negative() -> None:
    with pytest.raises(ValidationError):
        TokenDelta(request_id="r-1", index=-1, text="x", model="m")
    body = _body(SAMPLES[TokenDelta], index=-1)
    assert "index" in _reason(orjson.dumps(body), TokenDelta)
