"""The parts of a conversation request: turns, sampling, output format and tools.

They follow OpenAI's chat completions fields, so a gateway body maps onto them one
to one and a producer in another language can write them from OpenAI's reference.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
INSTRUCTION_ROLES = frozenset({"system", "developer"})


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FunctionCall(_Part):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""
    """The arguments as a JSON text, as the model wrote them."""


class ToolCall(_Part):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatTurn(_Part):
    """One turn of a conversation."""

    role: Role
    content: str = ""
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] = Field(default_factory=list, max_length=32)
    """An assistant turn's calls of the caller's tools."""
    tool_call_id: str | None = Field(default=None, max_length=128)
    """A tool turn: the call it answers."""

    def wire(self) -> dict[str, Any]:
        """The turn as an OpenAI-compatible engine takes it (unset fields left out)."""
        return self.model_dump(mode="json", exclude_defaults=True) | {
            "role": self.role,
            "content": self.content,
        }


class Sampling(_Part):
    """How the next tokens are drawn. Unset fields take the engine pool's settings
    (temperature 0 on the embedded engine)."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("a stop sequence may not be empty")
        return stop

    def deterministic(self) -> bool:
        """Whether the same request gives the same answer: greedy, or seeded."""
        return self.seed is not None or self.temperature in (None, 0.0)

    def asked(self) -> list[str]:
        """The fields a request set, by their OpenAI names."""
        return [name for name, value in self.model_dump().items() if value not in (None, [])]


class JsonSchemaFormat(_Part):
    name: str = Field(default="response", min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def json_mode(self) -> bool:
        return self.type != "text"


class FunctionSpec(_Part):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tool_choice(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    """ValueError unless ``choice`` can be met: it needs tools, and a named one is one of them."""
    if choice in (None, "none"):
        return
    if not tools:
        raise ValueError("tool_choice is set but no tools are given")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {
        t.function.name for t in tools
    }:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not a tool")


class TopLogprob(_Part):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Part):
    """One generated token's log probability, and the likeliest alternatives (OpenAI's
    ``choices[].logprobs.content[]``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
