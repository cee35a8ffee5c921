from __future__ import annotations

from typing import Any

import pytest

from processors import Rejected
from processors import openai_api as api
from schemas import Citation, Response, Sampling, Usage
from schemas.chat import TokenLogprob
from schemas.messages import Choice

USER = {"role": "user", "content": "What is Kafka?"}


def body(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "m1", "messages": [USER]}
    base.update(kw)
    return base


def resp(**kw: Any) -> Response:
    base: dict[str, Any] = {
        "request_id": "chatcmpl-1",
        "tenant": "acme",
        "text": "Kafka is a log [1].",
        "verdict": "allowed",
        "model": "m1",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=12, completion_tokens=5),
        "citations": [Citation(chunk_id="c1", doc_id="d1", score=0.8)],
        "template": "rag@v2/a",
        "cost_usd": 0.001,
        "pipeline_ms": 12.5,
    }
    base.update(kw)
    return Response(**base)


def to_req(chat: api.ChatCompletionRequest, **kw: Any) -> Any:
    base: dict[str, Any] = {
        "request_id": "rid",
        "tenant": "acme",
        "model": "m1",
        "timeout_s": 30.0,
        "now": 1000.0,
    }
    base.update(kw)
    return api.to_request(chat, **base)


def rejected(raw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        api.parse_chat_request(raw)
    return info.value


# --- parsing --------------------------------------------------------------------------------


def test_minimal_body_is_accepted() -> None:
    chat = api.parse_chat_request(body())
    assert chat.model == "m1"
    assert [m.text() for m in chat.messages] == ["What is Kafka?"]
    assert chat.stream is False
    assert chat.max_tokens is None


def test_unknown_fields_are_ignored_and_named() -> None:
    chat = api.parse_chat_request(body(colour="red", store=True, temperature=0.2))
    assert chat.model == "m1"
    assert chat.ignored() == ["colour", "store"]
    assert api.parse_chat_request(body()).ignored() == []


def test_sampling_and_format_fields_travel_on_the_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = api.parse_chat_request(
        body(
            temperature=0.7,
            top_p=0.9,
            stop="END",
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            n=2,
            logprobs=True,
            top_logprobs=3,
            user="u-1",
        )
    )
    request = to_req(chat)
    assert request.sampling == Sampling(
        temperature=0.7,
        top_p=0.9,
        stop=["END"],
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )
    assert request.response_format is not None
    assert request.response_format.json_schema is not None
    assert request.response_format.json_schema.schema_ == schema
    assert (request.n, request.logprobs, request.top_logprobs, request.user) == (2, True, 3, "u-1")


def test_tools_and_tool_turns_travel_on_the_request() -> None:
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    request = to_req(
        api.parse_chat_request(body(messages=messages, tools=[tool], tool_choice="auto"))
    )
    assert [t.role for t in request.messages] == ["user", "assistant", "tool"]
    assert request.messages[1].tool_calls[0].function.name == "weather"
    assert request.messages[2].tool_call_id == "c1"
    assert request.tools[0].function.name == "weather"
    assert request.tool_choice == "auto"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"50256": -100}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("web_search_options", {}),  # an empty object still asks for search
        ("reasoning_effort", "low"),
    ],
)
def test_a_field_no_engine_can_honour_is_refused_by_name(field: str, value: Any) -> None:
    if value == {}:
        value = {"search_context_size": "low"}
    exc = rejected(body(**{field: value}))
    assert exc.reason.startswith(f"{field}:")
    assert exc.code == "invalid_request"


def test_a_refused_field_sent_as_null_is_unset() -> None:
    assert api.parse_chat_request(body(logit_bias=None, audio=None)).ignored() == []


def test_list_of_text_parts_content() -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "Kafka?"}]
    chat = api.parse_chat_request(body(messages=[{"role": "user", "content": parts}]))
    assert chat.messages[0].text() == "What is Kafka?"
    assert to_req(chat).prompt == "What is Kafka?"


def test_non_object_body_is_rejected() -> None:
    raws: tuple[Any, ...] = ([], "hello", None, 3)
    for raw in raws:
        exc = rejected(raw)
        assert "JSON object" in exc.reason
        assert exc.code == "invalid_request"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"messages": [USER]}, "model"),
        (body(model=""), "model"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "system", "content": "be nice"}]), "messages"),
        (body(messages=[{"role": "user", "content": "   "}]), "messages"),
        (body(messages=[{"role": "user", "content": None}]), "messages"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_completion_tokens=0), "max_completion_tokens"),
        (body(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
        (body(temperature=3), "temperature"),
        (body(top_p=0), "top_p"),
        (body(n=9), "n"),
        (body(response_format={"type": "yaml"}), "response_format.type"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ],
)
def test_invalid_bodies_name_the_field(raw: dict[str, Any], field: str) -> None:
    exc = rejected(raw)
    assert exc.reason.startswith(f"{field}:")
    assert exc.code == "invalid_request"


def test_no_user_text_reason_is_readable() -> None:
    exc = rejected(body(messages=[{"role": "assistant", "content": "hello"}]))
    assert "user message" in exc.reason


# --- to_request -----------------------------------------------------------------------------


def test_to_request_takes_the_last_user_message() -> None:
    messages = [
        {"role": "system", "content": "ignore me"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "trailing"},
    ]
    request = to_req(api.parse_chat_request(body(messages=messages)))
    assert request.prompt == "second question"


def test_to_request_fields() -> None:
    chat = api.parse_chat_request(body(stream=True, metadata={"k": "v"}, max_tokens=50))
    request = to_req(chat, request_id="rid-7", tenant="t1", model="m9", timeout_s=12.5, now=500.0)
    assert request.request_id == "rid-7"
    assert request.tenant == "t1"
    assert request.model == "m9"
    assert request.stream is True
    assert request.metadata == {"k": "v"}
    assert request.max_tokens == 50
    assert request.created_at == 500.0
    assert request.deadline_at == 512.5


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    chat = api.parse_chat_request(body(max_tokens=50, max_completion_tokens=20))
    assert to_req(chat).max_tokens == 20
    assert to_req(api.parse_chat_request(body())).max_tokens is None


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_too_large_max_tokens_is_a_client_error(field: str) -> None:
    # Above the schema's bound the body itself is refused (the gateway's 400), before any
    # Request is built.
    exc = rejected(body(**{field: api.MAX_TOKENS + 1}))
    assert exc.code == "invalid_request"
    assert exc.reason == f"{field}: Input should be less than or equal to {api.MAX_TOKENS}"
    assert exc.retry_after_s is None
    # The bound itself is accepted and carried through.
    chat = api.parse_chat_request(body(**{field: api.MAX_TOKENS}))
    assert to_req(chat).max_tokens == api.MAX_TOKENS


def test_prompt_is_never_blank() -> None:
    messages = [{"role": "user", "content": "real question"}, {"role": "user", "content": "  "}]
    # The blank last turn is skipped: the prompt is the last user turn with text.
    chat = api.parse_chat_request(body(messages=messages))
    assert to_req(chat).prompt == "real question"


# --- status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("quota_exceeded", 429),
        ("prompt_blocked", 400),
        ("invalid_request", 400),
        ("duplicate_request", 409),
        ("timeout", 504),
        ("deadline_exceeded", 504),
        ("something_new", 500),
        (None, 500),
    ],
)
def test_status_for_errors(code: str | None, status: int) -> None:
    response = resp(text="", verdict="blocked", error="nope", error_code=code)
    assert api.status_for(response) == status


def test_status_for_success() -> None:
    assert api.status_for(resp()) == 200


# --- completion -----------------------------------------------------------------------------


def test_completion_shape() -> None:
    out = api.completion(resp(), created=1700000000)
    assert out["id"] == "chatcmpl-1"
    assert out["object"] == "chat.completion"
    assert out["created"] == 1700000000
    assert out["model"] == "m1"
    (choice,) = out["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Kafka is a log [1]."}
    assert choice["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    ext = out["kllm"]
    assert ext["template"] == "rag@v2/a"
    assert ext["cached"] is False
    assert ext["verdict"] == "allowed"
    assert ext["request_id"] == "chatcmpl-1"
    assert ext["citations"] == [{"chunk_id": "c1", "doc_id": "d1", "score": 0.8}]


def test_completion_reports_cached() -> None:
    assert api.completion(resp(cached=True), created=1)["kllm"]["cached"] is True


@pytest.mark.parametrize(
    ("pipeline", "openai"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("timeout", "stop"),
        ("error", "stop"),
    ],
)
def test_finish_reason_mapping(pipeline: str, openai: str) -> None:
    out = api.completion(resp(finish_reason=pipeline), created=1)
    assert out["choices"][0]["finish_reason"] == openai
    assert out["kllm"]["finish_reason"] == pipeline  # the real one is kept in the extension


# --- streaming ------------------------------------------------------------------------------


def test_closing_chunks_without_usage() -> None:
    chunks = api.closing_chunks(resp(finish_reason="timeout"), created=5, include_usage=False)
    assert len(chunks) == 1
    (last,) = chunks
    assert last["object"] == "chat.completion.chunk"
    assert last["id"] == "chatcmpl-1"
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert last["kllm"]["finish_reason"] == "timeout"
    assert last["kllm"]["template"] == "rag@v2/a"
    assert "usage" not in last


def test_closing_chunks_with_usage() -> None:
    last, usage = api.closing_chunks(resp(), created=5, include_usage=True)
    assert last["choices"][0]["finish_reason"] == "stop"
    assert usage["object"] == "chat.completion.chunk"
    assert usage["id"] == "chatcmpl-1"
    assert usage["created"] == 5
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def test_chunk_shape() -> None:
    out = api.chunk("rid", "m1", 3, {"content": "hi"})
    assert out["choices"] == [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]
    assert out["object"] == "chat.completion.chunk"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "invalid_request_error"),
        (409, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_error_body(status: int, kind: str) -> None:
    out = api.error_body("slow down", "quota_exceeded", status)
    assert out == {
        "error": {"message": "slow down", "type": kind, "code": "quota_exceeded", "param": None}
    }


def test_several_choices_are_listed_in_order() -> None:
    alternatives = [Choice(index=1, text="Another.", finish_reason="length", verdict="allowed")]
    body = api.completion(resp(alternatives=alternatives), created=1)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Kafka is a log [1].", "stop"),
        (1, "Another.", "length"),
    ]


def test_log_probabilities_come_back_when_moderation_kept_them() -> None:
    tokens = [TokenLogprob(token="Kafka", logprob=-0.5)]
    body = api.completion(resp(logprobs=tokens), created=1)
    assert body["choices"][0]["logprobs"] == {
        "content": [{"token": "Kafka", "logprob": -0.5, "bytes": None, "top_logprobs": []}]
    }
    assert "logprobs" not in api.completion(resp(), created=1)["choices"][0]
