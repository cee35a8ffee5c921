from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from kllm.runtime.dispatch import RecordRef, StageLogic, dispatch
from processors import Emit, Rejected
from processors.ingestion import Ingestion
from schemas import DeadLetter, Generation, Request, Response, decode, encode
from services import feedback
from topics import FEEDBACK, GENERATIONS, INFERENCE, REQUESTS, RESPONSES, RETRIEVAL

MakeRequest = Callable[..., Request]
REF = RecordRef(REQUESTS, 3, 42, "acme")


class Recorder:
    def __init__(self, out: list[Emit] | None = None, raises: Exception | None = None) -> None:
        self.seen: list[Any] = []
        self.out = out or []
        self.raises = raises

    def __call__(self, message: Any) -> list[Emit]:
        self.seen.append(message)
        if self.raises is not None:
            raise self.raises
        return self.out


def _letter(emit: Emit, ref: RecordRef = REF) -> DeadLetter:
    assert emit.topic == ref.topic.dlq
    assert emit.topic.name == f"{ref.topic.name}.dlq"
    assert isinstance(emit.message, DeadLetter)
    letter = emit.message
    assert decode(encode(letter), DeadLetter) == letter  # it can be produced as is
    return letter


def test_record_ref_str() -> None:
    assert str(REF) == f"{REQUESTS.name}[3]@42"


def test_valid_record_goes_to_processor(make_request: MakeRequest) -> None:
    req = make_request()
    out = [Emit(RETRIEVAL, req.request_id, req)]
    proc = Recorder(out)
    result = dispatch(StageLogic("test", Request, proc), REF, encode(req))
    assert proc.seen == [req]
    assert result == out


def test_valid_record_through_ingestion(make_request: MakeRequest) -> None:
    req = make_request(prompt="  hi  ")
    out = dispatch(StageLogic("ingestion", Request, Ingestion().process), REF, encode(req))
    assert [e.topic for e in out] == [RETRIEVAL]
    assert out[0].message.prompt == "hi"  # type: ignore[attr-defined]


@pytest.mark.parametrize("key", ["acme", None])
def test_bad_json_is_dead_lettered_without_response(key: str | None) -> None:
    ref = RecordRef(REQUESTS, 1, 7, key)
    raw = b"\x00\xffnot json at all{"
    proc = Recorder()
    out = dispatch(StageLogic("ingestion", Request, proc), ref, raw)
    assert proc.seen == []
    assert len(out) == 1  # no error response: nobody to send it to
    assert all(e.topic is not RESPONSES for e in out)
    letter = _letter(out[0], ref)
    assert out[0].key == (key or "")
    assert letter.stage == "ingestion"
    assert letter.reason.startswith("SchemaError: payload is not valid JSON")
    assert letter.source_topic == REQUESTS.name
    assert (letter.partition, letter.offset, letter.key) == (1, 7, key)
    assert letter.request_id is None
    assert base64.b64decode(letter.payload_b64) == raw


def test_unknown_version_with_request_id_gets_error_response(make_request: MakeRequest) -> None:
    body = orjson.loads(encode(make_request(request_id="rid-9")))
    body["v"] = 5
    raw = orjson.dumps(body)
    out = dispatch(StageLogic("ingestion", Request, Recorder()), REF, raw)
    assert [e.topic for e in out] == [REQUESTS.dlq, RESPONSES]
    letter = _letter(out[0])
    assert out[0].key == "rid-9"
    assert letter.request_id == "rid-9"
    assert "unknown schema version 5" in letter.reason
    assert base64.b64decode(letter.payload_b64) == raw

    emit = out[1]
    assert emit.key == "rid-9"
    response = emit.message
    assert isinstance(response, Response)
    assert response.request_id == "rid-9"
    assert response.finish_reason == "error"
    assert response.text == ""
    assert response.verdict == "blocked"
    assert response.error == letter.reason
    assert response.reasons == [letter.reason]
    assert decode(encode(response), Response) == response


def test_rejected_is_dead_lettered_with_its_reason(make_request: MakeRequest) -> None:
    req = make_request(request_id="rid-3")
    proc = Recorder(raises=Rejected("prompt is rude"))
    out = dispatch(StageLogic("ingestion", Request, proc), REF, encode(req))
    assert proc.seen == [req]
    assert [e.topic for e in out] == [REQUESTS.dlq, RESPONSES]
    letter = _letter(out[0])
    assert letter.reason == "Rejected: prompt is rude"
    assert letter.request_id == "rid-3"
    assert base64.b64decode(letter.payload_b64) == encode(req)
    assert out[1].message.error == "prompt is rude"  # type: ignore[attr-defined]


def test_real_ingestion_rejection(make_request: MakeRequest) -> None:
    raw = encode(make_request(max_tokens=4000))
    out = dispatch(StageLogic("ingestion", Request, Ingestion().process), REF, raw)
    assert [e.topic for e in out] == [REQUESTS.dlq, RESPONSES]
    assert "exceeds the cap" in _letter(out[0]).reason


def test_nested_request_id_on_generation_stage(
    make_generation: Callable[..., Generation],
) -> None:
    body = orjson.loads(encode(make_generation()))
    del body["model"]
    ref = RecordRef(GENERATIONS, 0, 1, "req-1")
    out = dispatch(StageLogic("moderation", Generation, Recorder()), ref, orjson.dumps(body))
    assert [e.topic for e in out] == [GENERATIONS.dlq, RESPONSES]
    letter = _letter(out[0], ref)
    assert letter.reason == "SchemaError: missing field 'model'"
    assert letter.source_topic == GENERATIONS.name
    assert out[1].message.request_id == "req-1"  # type: ignore[attr-defined]


def test_dead_letter_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kllm.runtime.dispatch"):
        dispatch(StageLogic("ingestion", Request, Recorder()), REF, b'{"request_id": "r"}')
    (record,) = [r for r in caplog.records if r.getMessage() == "dead-lettered"]
    assert record.request_id == "r"  # type: ignore[attr-defined]
    assert record.record == f"{REQUESTS.name}[3]@42"  # type: ignore[attr-defined]
    assert "missing field 'schema'" in record.reason  # type: ignore[attr-defined]


def test_a_side_reader_skips_what_the_owner_dead_letters(make_request: MakeRequest) -> None:
    """The feedback join reads the retrieval jobs too: a bad one must be dead-lettered
    (and its caller answered) once, by the retrieval stage, not again by the join."""
    bad = orjson.dumps({**orjson.loads(encode(make_request(request_id="r1"))), "prompt": ""})
    ref = RecordRef(RETRIEVAL, 0, 7, "r1")
    owner = dispatch(StageLogic("retrieval", Request, Recorder()), ref, bad)
    assert [e.topic for e in owner] == [RETRIEVAL.dlq, RESPONSES]
    side = dispatch(StageLogic("feedback", Request, Recorder(), owner=False), ref, bad)
    assert side == []


def test_the_feedback_stage_owns_only_the_feedback_topic() -> None:
    flows = feedback.build(feedback.Settings(comment_pii_entities=[]))
    assert {t.name: logic.owner for t, logic in flows} == {
        RETRIEVAL.name: False,
        INFERENCE.name: False,
        RESPONSES.name: False,
        FEEDBACK.name: True,
    }
