"""From raw record to output records: decode, process, and dead-letter what fails.

Shared by every stage so that failure handling is the same everywhere: a
record that cannot be processed goes to its topic's DLQ with the reason and
the original bytes, and when its request id is readable the caller also gets
an error response instead of waiting forever.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kllm.core.errors import ConfigError, PipelineError
from kllm.core.refs import where
from kllm.runtime.ports import Record
from processors.admission import KeyedState
from processors.base import Emit, Rejected
from schemas import DeadLetter, Message, Response, decode, peek_field, peek_request_id
from topics import RESPONSES, TopicSpec

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


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
    key = record.key()
    partition, offset = record.partition(), record.offset()
    return RecordRef(
        source,
        -1 if partition is None else partition,
        -1 if offset is None else offset,
        key.decode(errors="replace") if key is not None else None,
    )


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


def dead_letter_record(stage: str, ref: RecordRef, value: bytes, reason: str) -> Emit:
    """The DLQ twin of a record: the reason, where it came from, its bytes. Every
    dead-lettered record is logged here, once (no payload text: it may hold PII)."""
    request_id = peek_request_id(value)
    log.warning(
        "dead-lettered",
        extra={"request_id": request_id, "record": str(ref), "stage": stage, "reason": reason},
    )
    letter = DeadLetter(
        stage=stage,
        reason=reason,
        source_topic=ref.topic.name,
        partition=ref.partition,
        offset=ref.offset,
        key=ref.key,
        request_id=request_id,
        payload_b64=base64.b64encode(value).decode(),
    )
    return Emit(ref.topic.dlq, request_id or ref.key or "", letter)


def dead_letter(
    stage: str,
    ref: RecordRef,
    value: bytes,
    reason: str,
    exc: PipelineError | None = None,
    *,
    owner: bool = True,
) -> list[Emit]:
    """DLQ record, plus an error response when the caller can be identified.

    Only the stage that owns a topic dead-letters its records. A side reader
    (``owner=False``: the drift stage reading retrieval jobs), or a reader of a topic
    with no DLQ (the feedback join reading responses), skips the record: the topic's
    own stage answers for it, so skipping loses nothing of the caller's."""
    if not owner or not ref.topic.has_dlq:
        log.error(
            "unprocessable record skipped",
            extra={"request_id": peek_request_id(value), "record": str(ref), "reason": reason},
        )
        return []
    out = [dead_letter_record(stage, ref, value, reason)]
    request_id = peek_request_id(value)
    rejected = exc if isinstance(exc, Rejected) else None
    if request_id is not None and (rejected is None or rejected.notify):
        tenant = peek_field(value, "tenant") or "unknown"
        code = rejected.code if rejected else "invalid_request"
        retry = rejected.retry_after_s if rejected else None
        response = error_response(request_id, tenant, reason, code, retry)
        out.append(Emit(RESPONSES, request_id, response))
    return out


def decode_batch(
    stage: str,
    records: Sequence[tuple[RecordRef, bytes]],
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
            message = decode(value, schema)
            if check is not None:
                check(message)
        except PipelineError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            rejected.extend(dead_letter(stage, ref, value, reason, exc, owner=owner))
            continue
        good.append(message)
    return good, rejected


def dispatch(
    stage: StageLogic[M], ref: RecordRef, value: bytes, state: KeyedState | None = None
) -> list[Emit]:
    t0 = time.perf_counter()
    try:
        message = decode(value, stage.schema)
        if stage.process_keyed is not None and state is not None:
            out = stage.process_keyed(message, state)
        else:
            out = stage.process(message)
    except PipelineError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return dead_letter(stage.name, ref, value, reason, exc, owner=stage.owner)
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
