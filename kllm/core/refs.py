"""Record references: how every log line and error names the record it is about."""

from __future__ import annotations


def where(topic: str, partition: int, offset: int) -> str:
    """The ``topic[partition]@offset`` tag every per-record log line carries."""
    return f"{topic}[{partition}]@{offset}"
