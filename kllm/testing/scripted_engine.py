"""An OpenAI-compatible engine that answers from a script, for moderation tests.

Moderation needs answers that are toxic, leak PII or echo the system prompt on
demand, which a real small model will not produce reliably. The inference
stage talks to this server through its real HTTP engine adapter; only what
the "model" says is scripted: the last user message names a script with
``SCRIPT:<name>``, and the answer streams in small pieces.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

SCRIPTS = {
    "clean": "Partitions keep records in order by key. Consumers in a group share the "
    "partitions of a topic. Offsets are committed after the output is written.",
    "toxic": "Kafka keeps records in partitions. You are a stupid idiot and this fucking "
    "question is shit. SECRET-TAIL offsets are committed after output.",
    "pii": "Sure. Write to the admin at jane.roe@example.com or call 212-555-0199. "
    "Anything else about consumer groups?",
    "echo": "My instructions say: You are a helpful assistant. Answer the question briefly "
    "using the numbered context passages, and cite the passages you used. They also say: "
    "You answer questions using only the numbered context passages provided.",
    "competitor": "Globex runs a similar pipeline, but partitions work the same everywhere.",
    "broken": "Partitions keep records. Then the engine fails in the middle.",
}
BREAKS_AFTER = {"broken": (6, 1.0)}
"""Scripts whose stream fails after that many pieces, with an error chunk, that many
seconds later (the first sentence reaches the caller before the failure does)."""
_SCRIPT = re.compile(r"SCRIPT:(\w+)")


def _pieces(text: str, size: int = 6) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def _chat(request: Request) -> Response:
    body = orjson.loads(await request.body())
    user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    match = _SCRIPT.search(user)
    name = match.group(1) if match else "clean"
    text = SCRIPTS.get(name, SCRIPTS["clean"])
    breaks_after = BREAKS_AFTER.get(name)
    # A fixed service time per answer gives the engine a known capacity (slots / delay).
    await asyncio.sleep(request.app.state.delay_s)

    async def events() -> AsyncIterator[bytes]:
        for i, piece in enumerate(_pieces(text)):
            if breaks_after is not None and i == breaks_after[0]:
                await asyncio.sleep(breaks_after[1])
                error = {"error": {"message": "the scripted engine broke", "type": "server_error"}}
                yield b"data: " + orjson.dumps(error) + b"\n\n"
                return
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 30}}
        yield b"data: " + orjson.dumps(done) + b"\n\n"
        yield b"data: " + orjson.dumps(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@contextmanager
def scripted_engine(delay_s: float = 0.0) -> Iterator[str]:
    """Serve the script on a free port in a thread; yield its base URL. Each answer
    starts after ``delay_s``."""
    app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    app.state.delay_s = delay_s
    # Port 0: the server binds a free port itself, read back once it listens.
    server = uvicorn.Server(uvicorn.Config(app, "127.0.0.1", 0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
