"""The gateway's HTTP routes, one function each, and the app that serves them.

Cheap refusals happen here, before Kafka: a missing or wrong key (401), a body over
the size limit (413, refused before it is read), a malformed body (400), an unknown
model (404), too many callers already waiting (429).
Everything else (quotas, duplicates, guardrails) is ingestion's, and comes back as
an error reply that maps to its HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import orjson
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route

from kllm.core.errors import PipelineError
from kllm.gateway.config import STAGE, pool_of
from kllm.gateway.dashboard import PAGE
from kllm.gateway.http import HttpError, error_response, replayed, reply_error
from kllm.gateway.service import Gateway, Outcome
from kllm.gateway.stages import add_stage_health, stage_report
from kllm.runtime import tracing
from processors import openai_api as api
from processors import openai_embeddings as emb
from processors import text_completions
from processors.openai_api import Shape
from schemas import Feedback, encode
from topics import FEEDBACK

log = logging.getLogger(__name__)
Endpoint = Callable[[Gateway, HttpRequest], Awaitable[HttpResponse]]


def _json(body: object, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(body), status, None, "application/json")


async def read_body(http: HttpRequest, limit: int) -> bytes:
    """The body, refused (413) before it is read when its declared length is over
    ``limit``, and as soon as what arrives goes over it (a chunked or lying body)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HttpError(
            413, "request_too_large", f"body of {declared} bytes is over the limit of {limit}"
        )
    parts: list[bytes] = []
    size = 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "request_too_large", f"body is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def until_disconnected(http: HttpRequest) -> None:
    """Returns once the caller has closed its connection (its body already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


Parser = Callable[[object], api.ChatCompletionRequest]


async def parse(
    gw: Gateway, http: HttpRequest, tenant: str, parser: Parser = api.parse_chat_request
) -> api.ChatCompletionRequest:
    """The body as a chat request for a served model; refusals are dead-lettered (one
    too large with no payload: it was not read)."""
    try:
        raw = await read_body(http, gw.config.max_body_bytes)
    except HttpError as exc:
        gw.dead_letter(tenant, b"", exc)
        raise
    try:
        try:
            chat_request = parser(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, "invalid_request", f"body is not JSON: {exc}") from exc
        except PipelineError as exc:
            raise HttpError(400, "invalid_request", str(exc)) from exc
        if chat_request.model not in gw.config.models:
            known = ", ".join(gw.config.models)
            raise HttpError(
                404, "model_not_found", f"model {chat_request.model!r} is not served ({known})"
            )
    except HttpError as exc:
        gw.dead_letter(tenant, raw, exc)
        raise
    return chat_request


def _include_usage(chat_request: api.ChatCompletionRequest) -> bool:
    return bool(chat_request.stream_options and chat_request.stream_options.include_usage)


async def chat(gw: Gateway, http: HttpRequest) -> HttpResponse:
    """POST /v1/chat/completions, in the caller's trace (the trace id comes back)."""
    return await _traced(gw, http, "POST /v1/chat/completions", CHAT)


async def completions(gw: Gateway, http: HttpRequest) -> HttpResponse:
    """POST /v1/completions, the legacy text completions: the same path as chat."""
    return await _traced(gw, http, "POST /v1/completions", TEXT)


@dataclass(frozen=True)
class Dialect:
    """How an endpoint reads its body and shapes what it sends back."""

    parser: Parser
    shape: Shape


CHAT = Dialect(api.parse_chat_request, api.as_is)
TEXT = Dialect(text_completions.parse_text_request, text_completions.reshape)


async def _traced(gw: Gateway, http: HttpRequest, name: str, dialect: Dialect) -> HttpResponse:
    with tracing.server_span(STAGE, name, http.headers.items()) as span:
        response = await answer_chat(gw, http, dialect)
        span.set_attribute("http.response.status_code", response.status_code)
        span.set_attribute("kllm.request_id", response.headers.get("x-request-id", ""))
        response.headers["x-kllm-trace-id"] = tracing.trace_id(span)
        return response


async def answer_chat(gw: Gateway, http: HttpRequest, dialect: Dialect = CHAT) -> HttpResponse:
    """The answer, with the fields the body sent that changed nothing named in
    ``x-kllm-ignored``."""
    ignored: list[str] = []
    response = await _answer_chat(gw, http, ignored, dialect)
    if ignored:
        response.headers["x-kllm-ignored"] = ", ".join(ignored)
    return response


async def _answer_chat(
    gw: Gateway, http: HttpRequest, ignored: list[str], dialect: Dialect
) -> HttpResponse:
    t0 = time.perf_counter()
    try:
        tenant = gw.tenant(http)
        chat_request = await parse(gw, http, tenant, dialect.parser)
        ignored.extend(chat_request.ignored())
        request_id = gw.request_id(http, tenant, chat_request)
        try:
            request = api.to_request(
                chat_request,
                request_id=request_id,
                tenant=tenant,
                model=chat_request.model,
                timeout_s=gw.config.timeout_s,
            )
        except PipelineError as exc:  # a body valid for OpenAI that no request can carry
            raise HttpError(400, "invalid_request", str(exc)) from exc
        gone = partial(until_disconnected, http)
        if chat_request.stream and gw.fresh(request.request_id):
            include = _include_usage(chat_request)
            return await gw.stream(request, include, t0, gone, dialect.shape)
        outcome = await gw.answer(request, gone)
        if outcome.response.error is not None:
            raise reply_error(outcome.response)
    except HttpError as exc:
        gw.metrics.observe_error(exc.status, exc.code)
        log.info("refused", extra={"status": exc.status, "code": exc.code, "reason": str(exc)})
        return error_response(exc)
    return answered(gw, outcome, t0, chat_request, dialect.shape)


def answered(
    gw: Gateway,
    outcome: Outcome,
    t0: float,
    chat_request: api.ChatCompletionRequest,
    shape: Shape = api.as_is,
) -> HttpResponse:
    """The answer as JSON, or in one piece as SSE for a replayed streamed request."""
    response = outcome.response
    overhead = max(0.0, time.perf_counter() - t0 - outcome.pipeline_s)
    gw.metrics.observe_ok(outcome.pipeline_s, overhead, response.cached)
    headers = {
        "x-request-id": response.request_id,
        "x-kllm-pipeline-ms": f"{outcome.pipeline_s * 1000:.3f}",
        "x-kllm-gateway-ms": f"{overhead * 1000:.3f}",
    }
    log.info("answered", extra={"request_id": response.request_id, "cached": response.cached})
    created = int(time.time())
    if chat_request.stream:
        events = replayed(response, created, _include_usage(chat_request), shape)
        return StreamingResponse(events, headers=headers, media_type="text/event-stream")
    body = orjson.dumps(shape(api.completion(response, created)))
    return HttpResponse(body, 200, headers, "application/json")


async def feedback(gw: Gateway, http: HttpRequest) -> HttpResponse:
    try:
        tenant = gw.tenant(http)
        raw = await read_body(http, gw.config.max_body_bytes)
        try:
            body = api.parse_feedback(orjson.loads(raw))
        except (orjson.JSONDecodeError, PipelineError) as exc:
            error = HttpError(400, "invalid_request", str(exc))
            gw.dead_letter(tenant, raw, error)
            raise error from exc
        message = Feedback(tenant=tenant, **body.model_dump())
        await gw.publish(FEEDBACK.name, message.request_id, encode(message))
    except HttpError as exc:
        gw.metrics.observe_error(exc.status, exc.code)
        return error_response(exc)
    log.info("feedback", extra={"request_id": message.request_id, "rating": message.rating})
    return _json({"status": "accepted", "request_id": message.request_id}, 202)


async def embeddings(gw: Gateway, http: HttpRequest) -> HttpResponse:
    """The pipeline's embedding model, over Kafka, through the stage that owns it."""
    t0 = time.perf_counter()
    try:
        tenant = gw.tenant(http)
        raw = await read_body(http, gw.config.max_body_bytes)
        try:
            body = emb.parse_embeddings_request(orjson.loads(raw))
            request = emb.to_embedding_request(
                body,
                request_id=f"emb-{uuid.uuid4().hex}",
                tenant=tenant,
                timeout_s=gw.config.timeout_s,
            )
        except (orjson.JSONDecodeError, PipelineError) as exc:
            error = HttpError(400, "invalid_request", str(exc))
            gw.dead_letter(tenant, raw, error, "/v1/embeddings")
            raise error from exc
        answer = await gw.embed(request, partial(until_disconnected, http))
    except HttpError as exc:
        gw.metrics.observe_error(exc.status, exc.code)
        return error_response(exc)
    gw.metrics.observe_ok(time.perf_counter() - t0, 0.0, False)
    inputs = len(answer.vectors_b64)
    log.info("embedded", extra={"request_id": answer.request_id, "inputs": inputs})
    headers = {"x-request-id": answer.request_id}
    body_bytes = orjson.dumps(emb.embeddings_body(answer, body.encoding_format))
    return HttpResponse(body_bytes, 200, headers, "application/json")


async def models(gw: Gateway, http: HttpRequest) -> HttpResponse:
    try:
        gw.tenant(http)
    except HttpError as exc:
        return error_response(exc)
    data = [
        {
            "id": m,
            "object": "model",
            "created": 0,
            "owned_by": "kllm",
            "kllm": {"pool": pool_of(gw.config, m)},
        }
        for m in gw.config.models
    ]
    return _json({"object": "list", "data": data})


async def dashboard(gw: Gateway, _http: HttpRequest) -> HttpResponse:
    gw.monitor().start()
    return HttpResponse(PAGE, 200, None, "text/html; charset=utf-8")


async def dashboard_data(gw: Gateway, _http: HttpRequest) -> HttpResponse:
    data = gw.monitor().data()
    data["gateway"] = {"waiting": gw.busy, "streams": gw.streams}
    data["stages"] = stage_report(gw.config.status_file)[1]
    return _json(data)


async def health(gw: Gateway, _http: HttpRequest) -> HttpResponse:
    """Readiness: 503 unless the producer and the reply router both reach the broker
    (and the stages on the request path run). ``waiting`` is the callers holding a slot
    (the admission count), ``subscriptions`` the request ids the router routes for."""
    body = gw.readiness()
    body["ready"] = add_stage_health(body, gw.config.status_file) and bool(body["ready"])
    return _json(body, 200 if body["ready"] else 503)


async def metrics(gw: Gateway, _http: HttpRequest) -> HttpResponse:
    gw.metrics.waiting.set(gw.busy)
    body, content_type = gw.metrics.render()
    return HttpResponse(body, 200, None, content_type)


ROUTES: list[tuple[str, str, Endpoint]] = [
    ("/v1/chat/completions", "POST", chat),
    ("/v1/completions", "POST", completions),
    ("/v1/embeddings", "POST", embeddings),
    ("/v1/models", "GET", models),
    ("/v1/feedback", "POST", feedback),
    ("/healthz", "GET", health),
    ("/dashboard", "GET", dashboard),
    ("/dashboard/data", "GET", dashboard_data),
    ("/metrics", "GET", metrics),
]


def make_app(gw: Gateway) -> Starlette:
    routes = [Route(path, partial(fn, gw), methods=[method]) for path, method, fn in ROUTES]
    return Starlette(routes=routes, lifespan=partial(lifespan, gw))


@asynccontextmanager
async def lifespan(gw: Gateway, _app: Starlette) -> AsyncIterator[None]:
    """The producer's poll thread and the reply router run while the app serves."""
    gw.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        gw.close()
