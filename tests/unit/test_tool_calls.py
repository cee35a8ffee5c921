"""Tool calls: the grammar's schema, the reply read back, history written as text,
engine chunks gathered into calls, moderation of arguments and the OpenAI shapes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from kllm.adapters.engines.chat_chunks import ChunkReader
from kllm.adapters.engines.xllama import _tool_reply
from kllm.core.errors import EngineError
from processors import openai_api as api
from processors import tool_calls as tc
from processors.base import Rejected
from processors.inference import Delta, Finish, Options
from processors.moderation import Context, Moderator, OutputModerator
from processors.policies import Policy, PolicyBook
from schemas import Request, Response, Usage
from schemas.chat import (
    ChatTurn,
    FunctionCall,
    FunctionSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)

WEATHER = Tool(
    function=FunctionSpec(
        name="get_weather",
        description="The weather in a city",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    )
)
TIME = Tool(function=FunctionSpec(name="get_time"))
NAMED = NamedToolChoice(function=NamedFunction(name="get_time"))


def _valid(schema: dict[str, Any], value: Any) -> bool:
    return Draft202012Validator(schema).is_valid(value)


def test_auto_lets_the_model_answer_or_call() -> None:
    schema = tc.reply_schema([WEATHER, TIME], "auto", None)
    assert _valid(schema, {"response": "It is sunny."})
    assert _valid(schema, {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}})
    assert not _valid(schema, {"tool_call": {"name": "get_weather", "arguments": {}}})
    assert not _valid(schema, {"tool_call": {"name": "rm_rf", "arguments": {}}})


def test_required_and_a_named_choice_allow_only_calls() -> None:
    required = tc.reply_schema([WEATHER, TIME], "required", None)
    assert not _valid(required, {"response": "hi"})
    named_tools = tc.offered([WEATHER, TIME], NAMED)
    assert named_tools == [TIME]
    named = tc.reply_schema(named_tools, NAMED, None)
    assert _valid(named, {"tool_call": {"name": "get_time", "arguments": {}}})
    assert not _valid(named, {"tool_call": {"name": "get_weather", "arguments": {"city": "x"}}})


def test_none_offers_no_tools() -> None:
    assert tc.offered([WEATHER], "none") == []


def test_a_direct_answer_in_json_mode_follows_the_request_s_schema() -> None:
    fmt = ResponseFormat.model_validate(
        {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": {"type": "object", "required": ["n"]}},
        }
    )
    schema = tc.reply_schema([WEATHER], "auto", fmt)
    assert _valid(schema, {"response": {"n": 1}})
    assert not _valid(schema, {"response": "text"})


def test_a_reply_is_read_back_as_a_call_or_text() -> None:
    call = tc.read_reply('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}')
    assert call is not None and call.text == ""
    (made,) = call.calls
    assert made.function.name == "get_weather"
    assert json.loads(made.function.arguments) == {"city": "Oslo"}
    assert made.id.startswith("call_")
    assert tc.read_reply('{"response": "Sunny."}') == tc.Reply("Sunny.")
    assert tc.read_reply('{"response": {"n": 1}}') == tc.Reply('{"n": 1}')


@pytest.mark.parametrize("text", ['{"tool_call": {"name": "get_wea', "[]", '{"other": 1}', ""])
def test_a_reply_that_is_not_whole_reads_as_none(text: str) -> None:
    assert tc.read_reply(text) is None


def test_a_cut_reply_is_passed_on_as_text_with_its_finish_reason() -> None:
    finish = Finish("length", Usage(completion_tokens=60))
    assert _tool_reply('{"tool_call": {"na', finish) == [Delta('{"tool_call": {"na'), finish]
    events = _tool_reply('{"tool_call": {"name": "get_time", "arguments": {}}}', finish)
    (done,) = events
    assert isinstance(done, Finish)
    assert done.finish_reason == "tool_calls" and done.tool_calls[0].function.name == "get_time"


def _history() -> list[ChatTurn]:
    call = ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))
    return [
        ChatTurn(role="system", content="Be brief."),
        ChatTurn(role="user", content="Weather in Oslo?"),
        ChatTurn(role="assistant", tool_calls=[call]),
        ChatTurn(role="tool", tool_call_id="c1", content="Rain, 8 C"),
    ]


def test_history_is_written_as_plain_turns() -> None:
    offered = tc.as_text_turns(_history(), tools_offered=True)
    assert [t.role for t in offered] == ["system", "user", "assistant", "user"]
    assert json.loads(offered[2].content) == {
        "tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}
    }
    assert offered[3].content == "The function get_weather returned: Rain, 8 C"
    assert all(not t.tool_calls and t.tool_call_id is None for t in offered)
    worded = tc.as_text_turns(_history(), tools_offered=False)
    assert worded[2].content == 'I called get_weather with {"city":"Oslo"}.'


def test_the_tool_prompt_follows_the_leading_system_turns() -> None:
    prompt = tc.tool_prompt([WEATHER], "auto")
    assert "get_weather" in prompt.content and '"response"' in prompt.content
    assert '"response"' not in tc.tool_prompt([WEATHER], "required").content
    turns = tc.with_tool_prompt(tc.as_text_turns(_history(), tools_offered=True), prompt)
    assert turns[0].content == "Be brief." and turns[1] == prompt


def test_options_pass_tools_to_an_openai_compatible_engine() -> None:
    request = Request.from_prompt("hi", request_id="r", tools=[TIME], tool_choice=NAMED)
    fields = Options.of(request).fields()
    assert fields["tools"] == [
        {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    ]
    assert fields["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_choice": "required"}, "no tools are given"),
        ({"tools": [WEATHER], "tool_choice": NAMED}, "'get_time', which is not a tool"),
    ],
)
def test_a_tool_choice_must_name_a_tool(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Request.from_prompt("hi", request_id="r", **fields)


def test_streamed_call_pieces_are_gathered_by_index() -> None:
    reader = ChunkReader()
    pieces = [
        {"index": 0, "id": "a", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "b", "function": {"name": "get_time", "arguments": "{}"}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Oslo"}'}},
    ]
    for piece in pieces:
        reader.deltas({"choices": [{"delta": {"tool_calls": [piece]}}]})
    reader.deltas({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    finish = reader.finish()
    assert finish.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in finish.tool_calls] == [
        ("a", "get_weather", '{"city": "Oslo"}'),
        ("b", "get_time", "{}"),
    ]


class _Scores:
    name = "fake"

    def score(self, texts: Any) -> list[float]:
        return [0.9 if "hateful" in t else 0.0 for t in texts]


def _moderator() -> Moderator:
    policy = Policy(1, "default", redact_patterns=(re.compile(r"\bSECRET-\d+\b"),))
    book = PolicyBook(1, policy, {})
    return Moderator(OutputModerator(_Scores(), None, book))


def _call(arguments: str) -> ToolCall:
    return ToolCall(id="c", function=FunctionCall(name="send", arguments=arguments))


def test_call_arguments_are_redacted_inside_their_strings() -> None:
    result, calls = _moderator().judge("", [_call('{"code": "SECRET-42"}')], Context("default"))
    assert result.verdict == "redacted"
    assert json.loads(calls[0].function.arguments) == {"code": "[REDACTED]"}
    assert result.reasons[0].startswith("policy: tool call send:")


def test_a_blocked_call_blocks_the_answer_and_is_not_passed_on() -> None:
    result, calls = _moderator().judge("", [_call('{"text": "hateful"}')], Context("default"))
    assert result.verdict == "blocked" and calls == []


def _response(**fields: Any) -> Response:
    base = {"request_id": "r", "tenant": "t", "text": "", "verdict": "allowed", "model": "m"}
    return Response(**(base | {"finish_reason": "tool_calls"} | fields))


def test_a_completion_carries_calls_with_null_content() -> None:
    call = _call('{"to": "x"}')
    message = api.completion(_response(tool_calls=[call]), 0)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call.model_dump(mode="json")],
    }


def test_a_stream_closes_with_the_calls_then_the_finish_reason() -> None:
    chunks = api.closing_chunks(_response(tool_calls=[_call("{}")]), 0, include_usage=False)
    (piece,) = chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert piece["index"] == 0 and piece["function"]["name"] == "send"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = api.closing_chunks(_response(finish_reason="stop"), 0, include_usage=False)
    assert len(plain) == 1


def test_the_gateway_refuses_a_tool_choice_naming_no_tool() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER.model_dump()],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    with pytest.raises(Rejected, match="'get_time', which is not a tool"):
        api.parse_chat_request(body)


def test_a_call_cut_at_max_tokens_stays_length() -> None:
    reader = ChunkReader()
    piece = {"index": 0, "id": "a", "function": {"name": "get_time", "arguments": '{"tz": '}}
    reader.deltas({"choices": [{"delta": {"tool_calls": [piece]}, "finish_reason": "length"}]})
    finish = reader.finish()
    assert finish.finish_reason == "length" and finish.tool_calls[0].function.name == "get_time"


@pytest.mark.parametrize(
    "piece", [{"index": None, "function": {}}, {"index": 0, "function": "x"}, "text"]
)
def test_an_unreadable_call_piece_is_an_engine_error(piece: Any) -> None:
    with pytest.raises(EngineError, match="unreadable tool call piece"):
        ChunkReader().deltas({"choices": [{"delta": {"tool_calls": [piece]}}]})


def test_call_arguments_are_never_cut_by_the_length_cap() -> None:
    policy = Policy(1, "default", max_chars=10)
    moderator = Moderator(OutputModerator(_Scores(), None, PolicyBook(1, policy, {})))
    arguments = '{"body": "a long message that runs past ten characters"}'
    result, (call,) = moderator.judge("", [_call(arguments)], Context("default"))
    assert call.function.arguments == arguments and result.verdict == "allowed"
