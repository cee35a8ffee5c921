"""The OpenAI chat completions wire format, mapped onto the pipeline's messages.

Pure: a parsed body becomes a ``Request``; a ``Response`` becomes a completion,
its stream chunks, or an error body with the HTTP status the error's code means.
The whole conversation travels: the pipeline's template is the first system prompt,
the client's own system and developer turns follow it (unless the template locks
them out), and the latest user turn is the question retrieval searches for.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from processors.base import Rejected
from schemas import Request, Response
from schemas.chat import (
    ChatTurn,
    ResponseFormat,
    Sampling,
    Tool,
    ToolCall,
    ToolChoice,
    check_tool_choice,
)

STATUS_BY_CODE = {
    "invalid_request": 400,
    "prompt_blocked": 400,
    "context_length_exceeded": 400,
    "unauthorized": 401,
    "model_not_found": 404,
    "duplicate_request": 409,
    "request_too_large": 413,
    "idempotency_mismatch": 422,
    "quota_exceeded": 429,
    "overloaded": 429,
    "engine_error": 502,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "timeout": 504,
}
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# A failed generation says how it ended in its finish reason (processors.inference):
# a deadline is a timeout (504), a prompt too long for the model the caller's (400).
CODE_BY_FINISH = {"timeout": "timeout", "context_length": "context_length_exceeded"}
# What a caller is told of a failure inside the pipeline: never the upstream's own words
# (they can hold internal addresses or an upstream's response body).
CALLER_MESSAGES = {
    "engine_error": "the model failed to answer; retry later",
    "timeout": "no answer before the request's deadline",
    "unavailable": "the service is unavailable; retry shortly",
    "context_length_exceeded": "the prompt is longer than the model's context window",
}
MAX_TOKENS = 4096  # the request schema's own bound; ingestion applies its (lower) cap
# OpenAI's finish reasons; the pipeline's own (timeout, error) are reported in the extension.
FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls"}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def turn(self) -> ChatTurn:
        return ChatTurn(
            role=self.role,
            content=self.text(),
            name=self.name,
            tool_calls=list(self.tool_calls or []),
            tool_call_id=self.tool_call_id,
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of OpenAI's chat completions that change what comes back and that no engine
# here can do: refused with 400 rather than dropped. (None means "not set".)
REFUSED_FIELDS = {
    "logit_bias": "token biases are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "functions": "the deprecated 'functions' field is not supported: use 'tools'",
    "function_call": "the deprecated 'function_call' field is not supported: use 'tool_choice'",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning models are not served",
    "verbosity": "verbosity control is not supported",
}


# Fields accepted that change nothing here: OpenAI's storage and service tiers, and
# parallel tool calls (a model here may always make several).
NO_EFFECT_FIELDS = ("store", "service_tier", "parallel_tool_calls")


class ChatCompletionRequest(BaseModel):
    """A chat completions body. Every field OpenAI defines is honoured, refused with a
    400 naming it (:data:`REFUSED_FIELDS`, and fields an engine cannot honour, refused
    by the inference stage), or, for fields it does not know, ignored and reported."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = Field(default=None, ge=1, le=8)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    modalities: list[Literal["text"]] | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text().strip() for m in messages):
            raise ValueError("messages must contain a user message with text")
        return messages

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        check_tool_choice(self.tools, self.tool_choice)
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    def ignored(self) -> list[str]:
        """Fields sent that change nothing here: the ones this gateway does not know
        (ignored, as OpenAI does) and the ones about OpenAI's own service. They are
        named in the ``x-kllm-ignored`` header."""
        known = [f for f in NO_EFFECT_FIELDS if getattr(self, f) is not None]
        return sorted([*(self.model_extra or {}), *known])


def refuse_unsupported(
    body: dict[str, Any],
    refused: dict[str, str] = REFUSED_FIELDS,
    unset: tuple[object, ...] = (None, {}, []),
) -> None:
    """Rejected, naming the field, for a field of ``refused`` set (to a value not in
    ``unset``): no engine here can honour it."""
    for name, why in refused.items():
        if body.get(name) not in unset:
            raise Rejected(f"{name}: {why}")


def body_hash(chat: ChatCompletionRequest) -> str:
    """SHA-256 of what a request asks, in a canonical form: the same question asked
    again (with its fields in another order, or streamed this time) hashes alike."""
    asked = chat.model_dump(mode="json", exclude={"stream", "stream_options"})
    return hashlib.sha256(orjson.dumps(asked, option=orjson.OPT_SORT_KEYS)).hexdigest()


B = TypeVar("B", bound=BaseModel)
Shape = Callable[[dict[str, Any]], dict[str, Any]]
"""Reshapes a chat completion body or chunk for another endpoint (legacy completions)."""


def as_is(event: dict[str, Any]) -> dict[str, Any]:
    return event


def _first_error(exc: ValidationError) -> Rejected:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return Rejected(f"{where}: {first['msg']}")


def validated(model: type[B], body: Any) -> B:
    if not isinstance(body, dict):
        raise Rejected("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from exc


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """The body, validated; Rejected with a readable reason otherwise."""
    if isinstance(body, dict):
        refuse_unsupported(body)
        body = {k: v for k, v in body.items() if k not in REFUSED_FIELDS}
    return validated(ChatCompletionRequest, body)


class FeedbackBody(BaseModel):
    """POST /v1/feedback: a rating of an answer, by the id the answer carried."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=1, le=5)
    label: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=4000)


def parse_feedback(body: Any) -> FeedbackBody:
    return validated(FeedbackBody, body)


def to_request(
    chat: ChatCompletionRequest,
    *,
    request_id: str,
    tenant: str,
    model: str | None,
    timeout_s: float,
    now: float | None = None,
) -> Request:
    now = time.time() if now is None else now
    try:
        return Request(
            request_id=request_id,
            tenant=tenant,
            messages=[m.turn() for m in chat.messages],
            model=model,
            max_tokens=chat.max_completion_tokens or chat.max_tokens,
            sampling=Sampling(
                temperature=chat.temperature,
                top_p=chat.top_p,
                stop=list(chat.stop or []),
                seed=chat.seed,
                presence_penalty=chat.presence_penalty,
                frequency_penalty=chat.frequency_penalty,
            ),
            response_format=chat.response_format,
            tools=list(chat.tools or []),
            tool_choice=chat.tool_choice,
            n=chat.n or 1,
            logprobs=bool(chat.logprobs),
            top_logprobs=chat.top_logprobs,
            user=chat.user,
            stream=chat.stream,
            created_at=now,
            deadline_at=now + timeout_s,
            metadata=dict(chat.metadata or {}),
        )
    except ValidationError as exc:
        raise _first_error(exc) from exc


def error_code_for(response: Response) -> str:
    """The machine-readable kind of a failed response, as a caller is told it."""
    code = response.error_code or "error"
    if code == "engine_error":
        return CODE_BY_FINISH.get(response.finish_reason, code)
    return code


def status_for(response: Response) -> int:
    if response.error is None:
        return 200
    return STATUS_BY_CODE.get(error_code_for(response), 500)


def caller_message(response: Response) -> str:
    """The error message a caller sees: the pipeline's own words for a refusal of its
    request (4xx), a fixed sentence for a failure inside the pipeline."""
    code, status = error_code_for(response), status_for(response)
    if status < 500 and code in CALLER_MESSAGES:
        return CALLER_MESSAGES[code]
    if status < 500:
        return response.error or "refused"
    return CALLER_MESSAGES.get(code, "the request failed inside the pipeline; retry later")


def replayable(response: Response) -> bool:
    """Whether an answer is final, to be given again to a caller repeating its
    Idempotency-Key: a success or a refusal of the request itself, never an outcome a
    retry may change (429, a timeout, a failure inside the pipeline)."""
    return status_for(response) < 500 and status_for(response) not in (408, 409, 429)


def error_body(message: str, code: str, status: int) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPE_BY_STATUS.get(status, "server_error"),
            "code": code,
            "param": None,
        }
    }


def _logprobs(response: Response) -> dict[str, Any]:
    if response.logprobs is None:
        return {}
    return {"logprobs": {"content": [t.model_dump(mode="json") for t in response.logprobs]}}


def _finish(response: Response) -> str:
    return _finish_reason(response.finish_reason)


def _finish_reason(reason: str) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def _usage(response: Response) -> dict[str, int]:
    u = response.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def extension(response: Response) -> dict[str, Any]:
    """What the pipeline knows beyond OpenAI's fields, under the ``kllm`` key."""
    return {
        "request_id": response.request_id,
        "verdict": response.verdict,
        "finish_reason": response.finish_reason,
        "citations": [c.model_dump() for c in response.citations],
        "template": response.template,
        "policy": response.policy,
        "cached": response.cached,
        "instructions_dropped": response.instructions_dropped,
        "trimmed_turns": response.trimmed_turns,
        "fallback": response.fallback,
        "answer_mode": response.answer_mode,
        "groundedness": response.groundedness,
        "cost_usd": response.cost_usd,
        "pipeline_ms": response.pipeline_ms,
        "engine_ms": response.engine_ms,
        "ttft_ms": response.ttft_ms,
    }


def _message(text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """An answer as OpenAI's assistant message: with calls, and no text, its content is null."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [c.model_dump(mode="json") for c in calls],
    }


def call_pieces(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as a stream's delta carries them: each whole, with its index."""
    return [{"index": i, **c.model_dump(mode="json")} for i, c in enumerate(calls)]


def completion(response: Response, created: int) -> dict[str, Any]:
    return {
        "id": response.request_id,
        "object": "chat.completion",
        "created": created,
        "model": response.model,
        "choices": [
            {
                "index": 0,
                "message": _message(response.text, response.tool_calls),
                "finish_reason": _finish(response),
                **_logprobs(response),
            },
            *(
                {
                    "index": c.index,
                    "message": _message(c.text, c.tool_calls),
                    "finish_reason": _finish_reason(c.finish_reason),
                }
                for c in response.alternatives
            ),
        ],
        "usage": _usage(response),
        "kllm": extension(response),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def closing_chunks(
    response: Response, created: int, include_usage: bool, finish_reason: str | None = None
) -> Sequence[dict[str, Any]]:
    """The tool calls if any, the last chunk (the finish reason, or ``finish_reason``
    when given, and the pipeline's extension), then usage if asked."""
    rid, model = response.request_id, response.model
    out = []
    if response.tool_calls:
        out.append(chunk(rid, model, created, {"tool_calls": call_pieces(response.tool_calls)}))
    last = chunk(rid, model, created, {}, finish_reason or _finish(response))
    last["kllm"] = extension(response)
    out.append(last)
    if include_usage:
        out.append(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(response),
            }
        )
    return out
