"""HTTP pieces of the gateway: errors as OpenAI-style JSON bodies, and an answer
replayed as a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.responses import Response as HttpResponse

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
    status = api.status_for(response)
    retry = response.retry_after_s
    return HttpError(
        status,
        response.error_code or "error",
        response.error or "failed",
        retry_after=max(1, round(retry)) if retry is not None else None,
    )


async def replayed(response: Response, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    rid, model = response.request_id, response.model
    yield data(api.chunk(rid, model, created, {"role": "assistant", "content": response.text}))
    for event in api.closing_chunks(response, created, include_usage):
        yield data(event)
    yield b"data: [DONE]\n\n"
