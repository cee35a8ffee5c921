"""From raw record to output records: decode, process, and dead-letter what fails.

Shared by every stage so that failure handling is the same everywhere: a record that
cannot be processed, whatever its size or shape (a null value, bytes that are not UTF-8,
a processor that raises, an output too large to publish), goes to its topic's DLQ once
with the reason, and when its request id is readable the caller also gets an error
response instead of waiting forever. The DLQ record always fits the broker: it keeps
the payload whole only up to ``DLQ_WHOLE_BYTES``, else a prefix with the whole's size
and SHA-256. A source offset already dead-lettered (a replay after a crash, or a
partition that moved) is not dead-lettered again, and a request whose answer is already
on the responses topic is not answered again (kllm.runtime.ledger).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kllm.core.errors import BrokerError, ConfigError, PipelineError
from kllm.core.refs import readable_key, where
from kllm.runtime import ledger
from kllm.runtime.ports import Record
from processors.admission import KeyedState
from processors.base import Emit, Rejected
from schemas import (
    DeadLetter,
    Message,
    Response,
    SchemaError,
    decode,
    encode,
    peek_field,
    peek_request_id,
)
from topics import RESPONSES, TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DLQ_WHOLE_BYTES = 64 * 1024
"""A payload up to this size is kept whole in its DLQ record; a larger one, a prefix."""
DLQ_PREFIX_BYTES = 4 * 1024
"""The prefix kept of a payload over ``DLQ_WHOLE_BYTES``."""
OUTPUT_MAX_BYTES = 900_000
"""The largest output a stage publishes: under the producers' 1,000,000-byte default
and Kafka's default broker limit. A record whose outputs are larger is dead-lettered."""
_REASON_CHARS = 1000
_KEY_CHARS = 256
_ID_CHARS = 128  # Request.request_id's limit


@dataclass(frozen=True)
class RecordRef:
    """Where a record came from."""

    topic: TopicSpec
    partition: int
    offset: int
    key: str | None

    def __str__(self) -> str:
        return where(self.topic.name, self.partition, self.offset)


def ref_of(source: TopicSpec, record: Record) -> RecordRef:
    """Where ``record`` came from. A key that is not UTF-8 is kept readable, never fatal."""
    partition, offset = record.partition(), record.offset()
    return RecordRef(
        source,
        -1 if partition is None else partition,
        -1 if offset is None else offset,
        readable_key(record.key()),
    )


def request_id_of(value: bytes | None) -> str | None:
    """The request id a payload names, if it could be one (a caller to answer)."""
    found = peek_request_id(value)
    return found if found and len(found) <= _ID_CHARS else None


@dataclass(frozen=True)
class StageLogic(Generic[M]):
    """A stage: its name, the schema it reads, and its processor. A stage that keeps
    state per record key gives ``process_keyed``; the runtime then hands it the state.
    ``owner`` False: a side reader of another stage's topic (the feedback join reading
    retrieval jobs), which skips what it cannot use instead of dead-lettering it, so a
    bad record is dead-lettered, and its caller answered, once."""

    name: str
    schema: type[M]
    process: Callable[[M], list[Emit]]
    process_keyed: Callable[[M, KeyedState], list[Emit]] | None = None
    owner: bool = True


def keyed_only(_message: Message) -> list[Emit]:
    """``StageLogic.process`` of a stage that runs only with keyed state: the runtime
    always hands such a stage its state, so getting here is a wiring bug."""
    raise ConfigError("this stage runs only with keyed state")


def error_response(
    request_id: str,
    tenant: str,
    reason: str,
    code: str = "invalid_request",
    retry_after_s: float | None = None,
) -> Response:
    return Response(
        request_id=request_id,
        tenant=tenant,
        text="",
        verdict="blocked",
        reasons=[reason],
        model="",
        finish_reason="error",
        error=reason,
        error_code=code,
        retry_after_s=retry_after_s,
    )


def dead_letter_record(stage: str, ref: RecordRef, value: bytes | None, reason: str) -> list[Emit]:
    """The DLQ twin of a record, or nothing when that source offset already has one.
    Every dead-lettered record is logged here, once (no payload text: it may hold PII)."""
    request_id = request_id_of(value)
    book = ledger.installed()
    if book is not None and book.already_lettered(ref.topic.name, ref.partition, ref.offset):
        log.info("already dead-lettered", extra={"request_id": request_id, "record": str(ref)})
        return []
    log.warning(
        "dead-lettered",
        extra={"request_id": request_id, "record": str(ref), "stage": stage, "reason": reason},
    )
    payload = value or b""
    truncated = len(payload) > DLQ_WHOLE_BYTES
    letter = DeadLetter(
        stage=stage,
        reason=reason[:_REASON_CHARS],
        source_topic=ref.topic.name,
        partition=ref.partition,
        offset=ref.offset,
        key=ref.key[:_KEY_CHARS] if ref.key is not None else None,
        request_id=request_id,
        payload_b64=base64.b64encode(payload[:DLQ_PREFIX_BYTES] if truncated else payload).decode(),
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_truncated=truncated,
    )
    key = request_id or (ref.key[:_KEY_CHARS] if ref.key else "")
    return [Emit(ref.topic.dlq, key, letter)]


def dead_letter(
    stage: str,
    ref: RecordRef,
    value: bytes | None,
    reason: str,
    exc: PipelineError | None = None,
    *,
    owner: bool = True,
    code: str | None = None,
) -> list[Emit]:
    """DLQ record, plus an error response when the caller can be identified (``code``:
    the caller's error code, else one from ``exc``).

    Only the stage that owns a topic dead-letters its records. A side reader
    (``owner=False``: the drift stage reading retrieval jobs), or a reader of a topic
    with no DLQ (the feedback join reading responses), skips the record: the topic's
    own stage answers for it, so skipping loses nothing of the caller's. The caller's
    error answer is sent again on a replay: a caller takes the first answer it gets."""
    request_id = request_id_of(value)
    if not owner or not ref.topic.has_dlq:
        log.error(
            "unprocessable record skipped",
            extra={"request_id": request_id, "record": str(ref), "reason": reason[:200]},
        )
        return []
    out = dead_letter_record(stage, ref, value, reason)
    rejected = exc if isinstance(exc, Rejected) else None
    if request_id is not None and (rejected is None or rejected.notify):
        tenant = peek_field(value, "tenant") or "unknown"
        code = code or (rejected.code if rejected else _code_for(exc))
        retry = rejected.retry_after_s if rejected else None
        # A refusal reads as the caller's own problem ("n: ..."), without the class name
        # the DLQ record keeps for operators.
        told = str(rejected) if rejected is not None else reason
        response = error_response(request_id, tenant[:64], told[:_REASON_CHARS], code, retry)
        out.append(Emit(RESPONSES, request_id, response))
    return out


def unanswered(out: list[Emit], where: Callable[[str], str]) -> list[Emit]:
    """``out`` without the answers already given (on the responses topic, or by this
    process moments ago: kllm.runtime.ledger.AnswerLedger): a replayed record's answer
    went out before the replay. Only the answer is dropped; the record's other outputs
    are published again (at least once). A ledger that cannot read the topic keeps the
    answer: a duplicate, never a loss. ``where``: the source record of a request id, for the log."""
    book = ledger.installed_answers()
    if book is None:
        return out
    kept: list[Emit] = []
    for emit in out:
        rid = getattr(emit.message, "request_id", None)
        if emit.topic == RESPONSES and isinstance(rid, str):
            try:
                if book.already_answered(rid):
                    log.info("already answered", extra={"request_id": rid, "record": where(rid)})
                    continue
            except BrokerError as exc:
                log.warning(
                    "answer ledger unreadable; answering",
                    extra={"request_id": rid, "record": where(rid), "error": str(exc)},
                )
            book.note(rid)
        kept.append(emit)
    return kept


def _code_for(exc: PipelineError | None) -> str:
    """The caller's error code for a failure that is not a refusal: the record itself is
    bad (it does not decode, or holds what no stage can use) when ``exc`` is None or a
    SchemaError; else something inside the pipeline failed (a store, an engine, a bug)."""
    if exc is None or isinstance(exc, SchemaError):
        return "invalid_request"
    return "unavailable"


def unusable(value: bytes | None) -> str | None:
    """Why a payload cannot be read at all, before any schema: None when it may be."""
    if value is None:
        return "SchemaError: null value (a tombstone)"
    return None


def oversized(out: Sequence[Emit]) -> str | None:
    """Why ``out`` cannot be published whole: an output over ``OUTPUT_MAX_BYTES``."""
    for emit in out:
        size = len(encode(emit.message)) + len(emit.key or "")
        if size > OUTPUT_MAX_BYTES:
            return (
                f"OutputTooLarge: {emit.topic.name} record of {size} bytes (max {OUTPUT_MAX_BYTES})"
            )
    return None


def internal_failure(stage: str, ref: RecordRef, value: bytes | None, exc: Exception) -> str:
    """The reason for a record whose processing raised something unexpected (a bug, or a
    library's error nobody translated): logged with its traceback, never its payload."""
    log.exception(
        "processing raised",
        extra={"request_id": request_id_of(value), "record": str(ref), "stage": stage},
    )
    return f"InternalError: {type(exc).__name__}"


def decode_batch(
    stage: str,
    records: Sequence[tuple[RecordRef, bytes | None]],
    schema: type[M],
    check: Callable[[M], None] | None = None,
    *,
    owner: bool = True,
) -> tuple[list[M], list[Emit]]:
    """The readable messages of a batch (that pass ``check``, which raises to refuse),
    and the dead-letter outputs for the rest: one bad record never fails its batch."""
    good: list[M] = []
    rejected: list[Emit] = []
    for ref, value in records:
        try:
            message = decode_value(value, schema)
            if check is not None:
                check(message)
        except PipelineError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            rejected.extend(dead_letter(stage, ref, value, reason, exc, owner=owner))
            continue
        good.append(message)
    return good, rejected


def decode_value(value: bytes | None, schema: type[M]) -> M:
    """``value`` as ``schema``; a null value is refused like any unreadable payload."""
    if (why := unusable(value)) is not None:
        raise SchemaError(why.removeprefix("SchemaError: "))
    assert value is not None
    return decode(value, schema)


def dispatch(
    stage: StageLogic[M], ref: RecordRef, value: bytes | None, state: KeyedState | None = None
) -> list[Emit]:
    """One record's outputs (its DLQ record and error answer if it fails), without an
    answer already given (``unanswered``: each runner filters its outputs once)."""
    return unanswered(_dispatch(stage, ref, value, state), lambda _rid: str(ref))


def _dispatch(
    stage: StageLogic[M], ref: RecordRef, value: bytes | None, state: KeyedState | None
) -> list[Emit]:
    t0 = time.perf_counter()
    try:
        message = decode_value(value, stage.schema)
        if stage.process_keyed is not None and state is not None:
            out = stage.process_keyed(message, state)
        else:
            out = stage.process(message)
    except PipelineError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return dead_letter(stage.name, ref, value, reason, exc, owner=stage.owner)
    except Exception as exc:  # noqa: BLE001 - a bug must not crash-loop the stage on one record
        reason = internal_failure(stage.name, ref, value, exc)
        return dead_letter(stage.name, ref, value, reason, owner=stage.owner, code="unavailable")
    if (too_big := oversized(out)) is not None:
        return dead_letter(stage.name, ref, value, too_big, owner=stage.owner)
    log.info(
        "processed",
        extra={
            # Outputs are keyed by request id: no second parse of the payload on the hot path.
            "request_id": out[0].key if out else None,
            "record": str(ref),
            "ms": round((time.perf_counter() - t0) * 1000, 2),
            "out": [e.topic.name for e in out],
        },
    )
    return out
