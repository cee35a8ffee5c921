"""HTTP pieces of the gateway: errors as OpenAI-style JSON bodies, and an answer
replayed as a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kllm.core.errors import PipelineError
from kllm.gateway.live import data
from processors import openai_api as api
from schemas import Response


class HttpError(PipelineError):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


def error_response(exc: HttpError) -> HttpResponse:
    headers = {"retry-after": str(exc.retry_after)} if exc.retry_after else None
    body = api.error_body(str(exc), exc.code, exc.status)
    return HttpResponse(orjson.dumps(body), exc.status, headers, "application/json")


def reply_error(response: Response) -> HttpError:
    """An error reply as the caller's HTTP error. Its message is the pipeline's own for a
    refusal (4xx), a fixed sentence otherwise: upstream errors can name internal
    addresses or quote an upstream's response body."""
    status = api.status_for(response)
    retry = response.retry_after_s
    if retry is None and status in (502, 503):
        retry = 1.0
    return HttpError(
        status,
        api.error_code_for(response),
        api.caller_message(response),
        retry_after=max(1, round(retry)) if retry is not None else None,
    )


class ReleasingStream(StreamingResponse):
    """A streamed response that calls ``release`` once it is over, however it ends: a
    stream whose caller left before it was sent never runs its generator at all, so
    the generator's own ``finally`` cannot be relied on to free what it holds."""

    def __init__(
        self, content: AsyncIterator[bytes], release: Callable[[], None], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._release = release
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


async def replayed(
    response: Response, created: int, include_usage: bool, shape: api.Shape = api.as_is
) -> AsyncIterator[bytes]:
    rid, model = response.request_id, response.model
    first = api.chunk(rid, model, created, {"role": "assistant", "content": response.text})
    yield data(shape(first))
    for event in api.closing_chunks(response, created, include_usage):
        yield data(shape(event))
    yield b"data: [DONE]\n\n"
