"""Raw HTTP callers for tests and benchmarks: a caller that sends its request and closes
the connection before any answer, as an impatient client does."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import orjson


def leave_early(
    url: str,
    key: str,
    body: object,
    after_s: float = 0.05,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """POST ``body`` as a chat completion, read whatever comes back within ``after_s``
    (nothing, for a request still waiting), then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    raw = orjson.dumps(body)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + raw)
        sock.settimeout(after_s)
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""
