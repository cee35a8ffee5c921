"""Any record, of any size or shape, is dead-lettered once and never stops its stage."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest

from kllm.core.errors import BrokerError, StoreError
from kllm.runtime import ledger
from kllm.runtime.dispatch import (
    DLQ_PREFIX_BYTES,
    DLQ_WHOLE_BYTES,
    OUTPUT_MAX_BYTES,
    RecordRef,
    StageLogic,
    dispatch,
)
from kllm.runtime.ledger import AnswerLedger, DeadLetterLedger, SourceRef
from processors import Emit
from schemas import DeadLetter, Request, Response, encode
from topics import REQUESTS, RESPONSES, RETRIEVAL

REF = RecordRef(REQUESTS, 1, 7, "acme")


def _stage(process: Any) -> StageLogic[Request]:
    return StageLogic("ingestion", Request, process)


def _letters(out: list[Emit]) -> list[DeadLetter]:
    found = [e.message for e in out if e.topic == REQUESTS.dlq]
    assert all(isinstance(m, DeadLetter) for m in found)
    for emit in out:  # every output can be published as it is
        assert len(encode(emit.message)) < OUTPUT_MAX_BYTES
    return found  # type: ignore[return-value]


def _answers(out: list[Emit]) -> list[Response]:
    return [e.message for e in out if e.topic == RESPONSES]  # type: ignore[misc]


def _request(**fields: Any) -> bytes:
    body = {"schema": "llm.request", "v": 1, "request_id": "r-1", "prompt": "hi"} | fields
    return orjson.dumps(body)


def never(_message: Request) -> list[Emit]:
    raise AssertionError("the processor must not see this record")


@pytest.fixture(autouse=True)
def no_ledger() -> Iterator[None]:
    ledger.install(None)
    ledger.install_answers(None)
    yield
    ledger.install(None)
    ledger.install_answers(None)


def test_a_null_value_is_dead_lettered_with_its_reason() -> None:
    (letter,) = _letters(dispatch(_stage(never), REF, None))
    assert "null value" in letter.reason
    assert letter.payload_size == 0 and letter.payload_b64 == ""


@pytest.mark.parametrize("size", [DLQ_WHOLE_BYTES + 1, 2_000_000, 6 * 1024 * 1024])
def test_a_large_record_keeps_a_prefix_its_size_and_digest(size: int) -> None:
    value = _request(prompt="x" * size, v=99)  # a version nobody reads
    out = dispatch(_stage(never), REF, value)
    (letter,) = _letters(out)
    assert letter.payload_truncated is True
    assert letter.payload_size == len(value)
    assert letter.payload_sha256 == hashlib.sha256(value).hexdigest()
    assert base64.b64decode(letter.payload_b64) == value[:DLQ_PREFIX_BYTES]
    (answer,) = _answers(out)  # a request id that can be read is answered
    assert answer.request_id == "r-1" and answer.error


def test_a_small_bad_record_is_kept_whole() -> None:
    value = b"\xff\xfe not json, not UTF-8 \x80"
    (letter,) = _letters(dispatch(_stage(never), REF, value))
    assert letter.payload_truncated is False
    assert base64.b64decode(letter.payload_b64) == value
    assert letter.payload_sha256 == hashlib.sha256(value).hexdigest()


def test_a_request_id_too_long_to_be_one_is_not_answered() -> None:
    out = dispatch(_stage(never), REF, _request(request_id="r" * 5000, prompt=""))
    (letter,) = _letters(out)
    assert letter.request_id is None
    assert not _answers(out)


def test_a_huge_key_and_reason_are_capped() -> None:
    ref = RecordRef(REQUESTS, 0, 1, "k" * 100_000)
    (letter,) = _letters(dispatch(_stage(never), ref, b"[" * 50_000))
    assert letter.key is not None and len(letter.key) <= 256
    assert len(letter.reason) <= 1000


def test_a_processor_that_raises_dead_letters_its_record_only() -> None:
    def broken(_m: Request) -> list[Emit]:
        raise KeyError("a bug")

    out = dispatch(_stage(broken), REF, _request())
    (letter,) = _letters(out)
    assert letter.reason == "InternalError: KeyError"
    (answer,) = _answers(out)
    assert answer.request_id == "r-1" and answer.error_code == "unavailable"  # 503, not 400


def test_a_failure_inside_the_pipeline_is_unavailable_and_a_bad_record_invalid() -> None:
    def store_down(_m: Request) -> list[Emit]:
        raise StoreError("the vector store is unreachable")

    (down,) = _answers(dispatch(_stage(store_down), REF, _request()))
    assert down.error_code == "unavailable"
    (bad,) = _answers(dispatch(_stage(never), REF, _request(v=99)))
    assert bad.error_code == "invalid_request"


def test_an_output_too_large_to_publish_dead_letters_its_input() -> None:
    def bloated(m: Request) -> list[Emit]:
        padded = m.model_copy(update={"metadata": {"padding": "y" * 1_000_000}})
        return [Emit(RETRIEVAL, m.request_id, padded)]

    out = dispatch(_stage(bloated), REF, _request())
    (letter,) = _letters(out)
    assert letter.reason.startswith(f"OutputTooLarge: {RETRIEVAL.name}")
    assert not [e for e in out if e.topic == RETRIEVAL]


class FakeDeadLetterLog:
    def __init__(self) -> None:
        self.pending: list[SourceRef] = []
        self.reads = 0

    def read_new(self) -> Iterable[SourceRef]:
        self.reads += 1
        new, self.pending = self.pending, []
        return new


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_source_offset_already_in_the_dlq_is_not_dead_lettered_again() -> None:
    log, clock = FakeDeadLetterLog(), Clock()
    ledger.install(DeadLetterLedger(log, refresh_s=1.0, clock=clock))
    first = dispatch(_stage(never), REF, b"garbage")
    assert len(_letters(first)) == 1
    log.pending.append((REF.topic.name, REF.partition, REF.offset))  # the broker has it now
    clock.now += 1.5
    again = dispatch(_stage(never), REF, b"garbage")  # a replay after a crash
    assert _letters(again) == []
    other = RecordRef(REQUESTS, REF.partition, REF.offset + 1, "acme")
    assert len(_letters(dispatch(_stage(never), other, b"garbage"))) == 1


def test_the_ledger_reads_the_dlq_at_most_once_per_refresh_interval() -> None:
    log, clock = FakeDeadLetterLog(), Clock()
    book = DeadLetterLedger(log, refresh_s=1.0, clock=clock)
    for offset in range(50):
        book.already_lettered(REQUESTS.name, 0, offset)
    assert log.reads == 1
    clock.now += 1.0
    book.already_lettered(REQUESTS.name, 0, 99)
    assert log.reads == 2


def test_the_ledger_forgets_the_oldest_offsets_beyond_its_bound() -> None:
    log, clock = FakeDeadLetterLog(), Clock()
    book = DeadLetterLedger(log, refresh_s=0.0, max_remembered=3, clock=clock)
    log.pending = [(REQUESTS.name, 0, o) for o in range(5)]
    assert book.already_lettered(REQUESTS.name, 0, 4)
    assert not book.already_lettered(REQUESTS.name, 0, 0)


def test_records_not_from_a_topic_are_never_deduplicated() -> None:
    log = FakeDeadLetterLog()
    book = DeadLetterLedger(log)
    assert not book.already_lettered(REQUESTS.name, -1, -1)
    assert log.reads == 0


class FakeAnswerLog:
    """The responses topic as the answer ledger reads it: request ids, or an outage."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.down = False

    def read_new(self) -> Iterable[str]:
        if self.down:
            raise BrokerError("the broker is not answering")
        new, self.pending = self.pending, []
        return new


def _answer_and_job(m: Request) -> list[Emit]:
    answer = Response(
        request_id=m.request_id,
        tenant=m.tenant,
        text="ok",
        model="m",
        verdict="allowed",
        finish_reason="stop",
    )
    return [Emit(RESPONSES, m.request_id, answer), Emit(RETRIEVAL, m.request_id, m)]


def test_a_replayed_request_already_answered_is_not_answered_again() -> None:
    log, clock = FakeAnswerLog(), Clock()
    ledger.install_answers(AnswerLedger(log, refresh_s=1.0, clock=clock))
    first = dispatch(_stage(_answer_and_job), REF, _request())
    assert [(a.request_id, a.error) for a in _answers(first)] == [("r-1", None)]
    log.pending.append("r-1")  # the answer was acknowledged; the offset was not committed
    clock.now += 1.5
    again = dispatch(_stage(_answer_and_job), REF, _request())  # the replay
    assert _answers(again) == []
    assert [e.topic for e in again] == [RETRIEVAL]  # only the answer is dropped
    other = dispatch(_stage(_answer_and_job), REF, _request(request_id="r-2"))
    assert [a.request_id for a in _answers(other)] == ["r-2"]


def test_an_error_answer_is_not_sent_twice_either() -> None:
    log = FakeAnswerLog()
    ledger.install_answers(AnswerLedger(log, refresh_s=0.0))
    assert len(_answers(dispatch(_stage(never), REF, _request(v=99)))) == 1
    log.pending.append("r-1")
    out = dispatch(_stage(never), REF, _request(v=99))
    assert _answers(out) == [] and len(_letters(out)) == 1


def test_an_unreadable_answer_ledger_answers_rather_than_lose_the_answer() -> None:
    log = FakeAnswerLog()
    ledger.install_answers(AnswerLedger(log, refresh_s=0.0))
    log.down = True
    out = dispatch(_stage(_answer_and_job), REF, _request())
    assert [(a.request_id, a.error) for a in _answers(out)] == [("r-1", None)]


def test_an_upstream_duplicate_before_the_answer_is_read_back_is_not_answered_again() -> None:
    log, clock = FakeAnswerLog(), Clock()
    book = AnswerLedger(log, refresh_s=1.0, clock=clock)
    ledger.install_answers(book)
    assert len(_answers(dispatch(_stage(_answer_and_job), REF, _request()))) == 1
    dup = RecordRef(REQUESTS, REF.partition, REF.offset + 1, "acme")  # a replayed upstream copy
    assert _answers(dispatch(_stage(_answer_and_job), dup, _request())) == []  # same refresh
    clock.now += 1.5  # read back from the topic, it is still answered
    assert _answers(dispatch(_stage(_answer_and_job), dup, _request())) == []


def test_an_answer_lost_with_its_broker_is_given_again_once_its_note_is_stale() -> None:
    # The answer was noted, but never reached the topic (the broker lost it in a crash):
    # within the note's window a replay is still dropped; past it, the topic decides.
    log, clock = FakeAnswerLog(), Clock()
    ledger.install_answers(AnswerLedger(log, refresh_s=1.0, clock=clock, note_trust_s=5.0))
    assert len(_answers(dispatch(_stage(_answer_and_job), REF, _request()))) == 1
    clock.now += 2.0
    assert _answers(dispatch(_stage(_answer_and_job), REF, _request())) == []
    clock.now += 4.0
    again = _answers(dispatch(_stage(_answer_and_job), REF, _request()))
    assert [a.request_id for a in again] == ["r-1"]
