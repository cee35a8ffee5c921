"""OpenAI's legacy text completions (``POST /v1/completions``), mapped onto chat.

A completions body becomes a chat body with its prompt as one user turn, so it
takes the same path (guardrails, retrieval, the engine, moderation, the cache).
What comes back is rendered in chat's shape first, then reshaped by :func:`reshape`:
``message.content`` and ``delta.content`` become ``text``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from processors.base import Rejected
from processors.openai_api import (
    MAX_TOKENS,
    ChatCompletionRequest,
    parse_chat_request,
    refuse_unsupported,
    validated,
)

# Fields that change what comes back and that no engine here can do.
REFUSED = {
    "echo": "echoing the prompt is not supported",
    "suffix": "insertion with a suffix is not supported",
    "logit_bias": "token biases are not supported",
}
LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


class TextCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    stream: StrictBool = False
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (a list of one is fine)")
            prompt = prompt[0]
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


def to_chat_body(body: Any) -> dict[str, Any]:
    """A completions body as the chat body that asks the same; Rejected naming the
    field for what cannot be honoured."""
    if not isinstance(body, dict):
        raise Rejected("the body must be a JSON object")
    refuse_unsupported(body, REFUSED, unset=(None, False, "", {}))
    if body.get("logprobs") not in (None, 0):
        body = {**body, "logprobs": True, "top_logprobs": body["logprobs"]}
    legacy = validated(TextCompletionRequest, body)
    chat = {k: v for k, v in body.items() if k not in ("prompt", "best_of", *REFUSED)}
    chat["messages"] = [{"role": "user", "content": legacy.prompt}]
    chat.setdefault("max_tokens", LEGACY_DEFAULT_MAX_TOKENS)
    return chat


def parse_text_request(body: Any) -> ChatCompletionRequest:
    return parse_chat_request(to_chat_body(body))


def reshape(event: dict[str, Any]) -> dict[str, Any]:
    """A chat completion, chunk or error body in the text completions shape."""
    if "choices" not in event:
        return event  # an error body, or the usage-only chunk's envelope below
    choices = []
    for choice in event["choices"]:
        part = choice.get("message") or choice.get("delta") or {}
        choices.append(
            {
                "index": choice.get("index", 0),
                "text": part.get("content") or "",
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return {**event, "object": "text_completion", "choices": choices}
