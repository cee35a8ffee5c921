"""Record references: how every log line and error names the record it is about."""

from __future__ import annotations


def where(topic: str, partition: int, offset: int) -> str:
    """The ``topic[partition]@offset`` tag every per-record log line carries."""
    return f"{topic}[{partition}]@{offset}"


def readable_key(key: bytes | str | None) -> str | None:
    """A record key as text: bytes that are not UTF-8 are replaced, never fatal.

    Anyone can produce any key; a replaced key matches no request id.
    """
    if isinstance(key, bytes):
        return key.decode(errors="replace")
    return key
