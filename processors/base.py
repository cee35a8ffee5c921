"""What every processor shares: the output record and the rejection error."""

from __future__ import annotations

from dataclasses import dataclass

from kllm.errors import PipelineError
from schemas import Message
from topics import TopicSpec


@dataclass(frozen=True)
class Emit:
    """One output record: where it goes, its key, and the message."""

    topic: TopicSpec
    key: str
    message: Message


class Rejected(PipelineError):
    """The input is well-formed but not acceptable; ``reason`` is sent to the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
