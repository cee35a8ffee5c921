"""Tool calls for an engine whose chat template knows no tools, enforced by grammar.

A small model served through llama.cpp with a plain ChatML template (SmolLM2's)
has no tool-call format of its own, so llama.cpp cannot parse one from its text.
Instead the engine asks for a JSON answer constrained by a schema built from the
caller's tools (llama.cpp turns the schema into a grammar), and reads that answer
back as either a tool call or text:

- ``tool_choice`` "auto" (the default with tools): ``{"response": ...}`` or
  ``{"tool_call": {"name": ..., "arguments": {...}}}``;
- "required", or one named function: only ``{"tool_call": ...}``, with the named
  function alone;
- "none": no grammar and no tool list; earlier calls and results stay in the
  conversation as text.

Earlier turns that carry calls and their results are written as text the model
can read: an assistant turn in the JSON it is asked to produce (in words when it
may not call), a tool turn as a user turn naming the function that answered.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.chat import (
    INSTRUCTION_ROLES,
    ChatTurn,
    FunctionCall,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)

CALL_KEY = "tool_call"
TEXT_KEY = "response"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def offered(tools: Sequence[Tool], choice: ToolChoice | None) -> list[Tool]:
    """The tools the model may call under ``choice`` (none for "none"; the request's
    schema has checked that a named choice names one of them)."""
    if choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return list(tools)


def _call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
    }


def _text_schema(response_format: ResponseFormat | None) -> dict[str, Any]:
    """What a direct answer may be: text, or the JSON the request's format asks."""
    if response_format is None or not response_format.json_mode():
        return {"type": "string"}
    if response_format.json_schema is not None and response_format.json_schema.schema_:
        return response_format.json_schema.schema_
    return {"type": "object"}


def reply_schema(
    tools: Sequence[Tool], choice: ToolChoice | None, response_format: ResponseFormat | None
) -> dict[str, Any]:
    """The JSON schema the model's answer must follow (``tools`` already :func:`offered`)."""
    call = {"type": "object", "properties": {CALL_KEY: _call_schema(tools)}, "required": [CALL_KEY]}
    if choice == "required" or isinstance(choice, NamedToolChoice):
        return call
    text = {
        "type": "object",
        "properties": {TEXT_KEY: _text_schema(response_format)},
        "required": [TEXT_KEY],
    }
    return {"anyOf": [text, call]}


def tool_prompt(tools: Sequence[Tool], choice: ToolChoice | None) -> ChatTurn:
    """A system turn that tells the model its tools and the answer's two shapes."""
    signatures = "\n".join(
        json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools
    )
    call = f'{{"{CALL_KEY}": {{"name": <function name>, "arguments": {{...}}}}}}'
    how = f"To call one, answer {call}."
    if not (choice == "required" or isinstance(choice, NamedToolChoice)):
        how += f' To answer directly, answer {{"{TEXT_KEY}": <your answer>}}.'
    text = f"You can call these functions, each given as a JSON signature:\n{signatures}\n{how}"
    return ChatTurn(role="system", content=text)


def with_tool_prompt(messages: Sequence[ChatTurn], prompt: ChatTurn) -> list[ChatTurn]:
    """``prompt`` after the leading system turns (the template's and the caller's)."""
    lead = 0
    while lead < len(messages) and messages[lead].role in INSTRUCTION_ROLES:
        lead += 1
    return [*messages[:lead], prompt, *messages[lead:]]


def as_text_turns(messages: Sequence[ChatTurn], *, tools_offered: bool) -> list[ChatTurn]:
    """The conversation with its calls and results written as plain turns: a call in
    the JSON the model is asked for when it may call again, in words when it may not
    (a model shown JSON it may not write answers in broken JSON)."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls}
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            parts = [m.content] if m.content else []
            for c in m.tool_calls:
                if tools_offered:
                    parts.append(json.dumps({CALL_KEY: _written(c.function)}))
                else:
                    parts.append(f"I called {c.function.name} with {c.function.arguments}.")
            out.append(ChatTurn(role="assistant", content="\n".join(parts)))
        elif m.role == "tool":
            name = names.get(m.tool_call_id or "", "the tool")
            out.append(ChatTurn(role="user", content=f"The function {name} returned: {m.content}"))
        else:
            out.append(m)
    return out


def _written(call: FunctionCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = call.arguments
    return {"name": call.name, "arguments": arguments}


@dataclass(frozen=True)
class Reply:
    """What the model answered: text, or calls (and then no text)."""

    text: str
    calls: tuple[ToolCall, ...] = ()


def read_reply(text: str, new_id: Callable[[], str] = new_call_id) -> Reply | None:
    """The constrained answer read back; None when it is not one (cut at max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if isinstance(value.get(CALL_KEY), dict):
        call = value[CALL_KEY]
        name, arguments = call.get("name"), call.get("arguments", {})
        if not isinstance(name, str) or not name:
            return None
        function = FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))
        return Reply("", (ToolCall(id=new_id(), function=function),))
    if TEXT_KEY in value:
        answer = value[TEXT_KEY]
        return Reply(answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False))
    return None
