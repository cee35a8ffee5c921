"""A streamed answer as the gateway serves it: moderated windows as they come, then
the closing chunk from the final response.

The gateway reads llm.tokens.moderated, never the raw token topic, so a caller
can only see text that moderation passed. The moderated deltas and the final
response travel on different topics, so either may arrive first: the stream
ends when it has both the closing delta and the response (a cached answer has
no deltas: the response alone is the whole stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from kllm.gateway.replies import Reply
from processors import openai_api as api
from schemas import Response, TokenDelta


def data(event: object) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


class LiveStream:
    def __init__(
        self,
        queue: asyncio.Queue[Reply],
        release: Callable[[], None],
        request_id: str,
        model: str,
        deadline: float,
        include_usage: bool,
        shape: api.Shape = api.as_is,
    ) -> None:
        self.queue = queue
        self.release = release
        self.request_id = request_id
        self.model = model
        self.deadline = deadline  # time.time() by which the pipeline has given up
        self.include_usage = include_usage
        self.shape = shape
        self.created = int(time.time())
        self.sent = -1  # highest moderated window index sent (replays are skipped)
        self.closing: TokenDelta | None = None
        self.response: Response | None = None

    async def next_reply(self) -> Reply:
        left = max(0.01, self.deadline + 1.0 - time.time())
        return await asyncio.wait_for(self.queue.get(), timeout=left)

    def _data(self, event: dict[str, Any]) -> bytes:
        return data(self.shape(event))

    def _chunk(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        return self._data(api.chunk(self.request_id, self.model, self.created, delta, finish))

    def _take(self, reply: Reply) -> bytes | None:
        """Record a reply; the SSE bytes to send for it, if any."""
        msg = reply.message
        if isinstance(msg, Response):
            self.response = msg
        elif isinstance(msg, TokenDelta):
            if msg.final:
                self.closing = msg
            elif msg.index > self.sent:
                self.sent = msg.index
                return self._chunk({"content": msg.text})
        return None

    def _complete(self) -> bool:
        r = self.response
        if r is None:
            return False
        return self.closing is not None or r.cached or (r.error is not None and self.sent < 0)

    async def events(self, first: Reply) -> AsyncIterator[bytes]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            reply: Reply | None = first
            while reply is not None:
                out = self._take(reply)
                if out is not None:
                    yield out
                if self._complete():
                    break
                try:
                    reply = await self.next_reply()
                except TimeoutError:
                    reply = None
            for event in self._ending():
                yield event
        finally:
            self.release()

    def _ending(self) -> list[bytes]:
        """The stream's last events. A failure ends it with OpenAI's error object, never
        a finish reason: a caller must not take a cut-off answer for a whole one."""
        r = self.response
        if r is None:  # the deadline passed without the final response
            body = api.error_body("no answer before the request's deadline", "timeout", 504)
            return [self._data(body), b"data: [DONE]\n\n"]
        if r.error is not None:
            code, status = api.error_code_for(r), api.status_for(r)
            body = api.error_body(api.caller_message(r), code, status)
            body["kllm"] = api.extension(r)
            return [self._data(body), b"data: [DONE]\n\n"]
        out = []
        if self.sent < 0 and self.closing is None and r.text:
            out.append(self._chunk({"content": r.text}))  # a cached answer: all at once
        cut = self.closing is not None and self.closing.finish_reason == "content_filter"
        closing = api.closing_chunks(
            r, self.created, self.include_usage, "content_filter" if cut else None
        )
        out.extend(self._data(c) for c in closing)
        out.append(b"data: [DONE]\n\n")
        return out
