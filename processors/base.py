"""What every processor shares: the output record and the rejection error."""

from __future__ import annotations

from dataclasses import dataclass

from kllm.core.errors import PipelineError
from schemas import Message
from topics import TopicSpec


@dataclass(frozen=True)
class Emit:
    """One output record: where it goes, its key, the message, and its Kafka headers
    (the stage's runtime fills them with the trace context; processors leave them)."""

    topic: TopicSpec
    key: str
    message: Message
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What a record produced; ``failure``, when set, is why the record must also be
    dead-lettered (e.g. a generation that failed after its retries)."""

    emits: list[Emit]
    failure: str | None = None


class Rejected(PipelineError):
    """The input is well-formed but not acceptable; ``reason`` is sent to the DLQ.

    ``code`` tells callers what kind of refusal it is (the gateway maps it to an
    HTTP status); ``retry_after_s`` says when trying again can succeed; ``notify``
    False sends no error response, for duplicates whose original gets the answer.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: str = "invalid_request",
        retry_after_s: float | None = None,
        notify: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.retry_after_s = retry_after_s
        self.notify = notify
