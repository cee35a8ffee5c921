"""OpenAI-style chat completion chunks (llama.cpp and any compatible server) to engine events."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kllm.core.errors import ContextLengthError, EngineError
from processors.inference import Delta, Finish
from processors.tool_calls import new_call_id
from schemas import Usage
from schemas.chat import FunctionCall, TokenLogprob, ToolCall

# How OpenAI-compatible servers word "the prompt does not fit": vLLM ("maximum context
# length", "maximum model length"), llama.cpp (exceed_context_size_error), OpenAI
# (context_length_exceeded).
_CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "context size",
    "exceed_context_size",
    "context window",
    "maximum model length",
)


def about_context(text: str) -> bool:
    """Whether an engine's error text says the prompt does not fit the model's context."""
    lowered = text.lower()
    return any(marker in lowered for marker in _CONTEXT_MARKERS)


def chunk_error(err: Any) -> EngineError:
    """An error chunk as the error to raise."""
    text = str(err.get("message", err) if isinstance(err, dict) else err)
    kind = str(err.get("type", "")) if isinstance(err, dict) else ""
    if about_context(f"{kind} {text}"):
        return ContextLengthError("the prompt does not fit the model's context window")
    return EngineError(f"engine error: {text[:200]}")


class ChunkReader:
    """Reads one stream's chunks: deltas as they come, the finish reason and usage at the end."""

    def __init__(self) -> None:
        self.finish_reason = "stop"
        self.usage = Usage()
        self.logprobs: list[TokenLogprob] = []
        self.calls: dict[int, dict[str, str]] = {}
        """Tool calls by index, as their pieces arrive: the id and name first, then
        the arguments' text piece by piece."""

    def deltas(self, chunk: dict[str, Any]) -> list[Delta]:
        if "error" in chunk:
            raise chunk_error(chunk["error"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        out = []
        for choice in chunk.get("choices") or []:
            self._take_logprobs(choice.get("logprobs"))
            delta = choice.get("delta") or {}
            self._take_calls(delta.get("tool_calls"))
            text = delta.get("content")
            if text:
                out.append(Delta(text))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return out

    def _take_logprobs(self, logprobs: Any) -> None:
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        for token in content or []:
            try:
                self.logprobs.append(TokenLogprob.model_validate(_known(token)))
            except ValidationError as exc:
                raise EngineError(
                    f"unreadable log probabilities: {exc.error_count()} errors"
                ) from exc

    def _take_calls(self, pieces: Any) -> None:
        for piece in pieces if isinstance(pieces, list) else []:
            function = piece.get("function") if isinstance(piece, dict) else None
            index = piece.get("index", max(self.calls, default=0)) if function else None
            if not isinstance(function, dict) or not isinstance(index, int):
                raise EngineError("unreadable tool call piece")
            call = self.calls.setdefault(index, {})
            for key, value in (("id", piece.get("id")), ("name", function.get("name"))):
                if value:
                    call[key] = str(value)
            call["arguments"] = call.get("arguments", "") + str(function.get("arguments") or "")

    def _tool_calls(self) -> tuple[ToolCall, ...]:
        try:
            return tuple(
                ToolCall(
                    id=c.get("id") or new_call_id(),
                    function=FunctionCall(name=c.get("name", ""), arguments=c["arguments"]),
                )
                for _, c in sorted(self.calls.items())
            )
        except ValidationError as exc:
            raise EngineError(f"unreadable tool call: {exc.error_count()} errors") from exc

    def finish(self) -> Finish:
        calls = self._tool_calls()
        # A call cut at max_tokens stays "length": its arguments are not whole.
        reason = "tool_calls" if calls and self.finish_reason != "length" else self.finish_reason
        return Finish(reason, self.usage, tuple(self.logprobs), calls)


_TOKEN_KEYS = ("token", "logprob", "bytes")


def _known(token: Any) -> Any:
    """A token's log probability without the fields servers add (llama.cpp's ``id``)."""
    if not isinstance(token, dict):
        return token
    known = {k: token[k] for k in _TOKEN_KEYS if k in token}
    tops = token.get("top_logprobs")
    if isinstance(tops, list):
        known["top_logprobs"] = [
            {k: t[k] for k in _TOKEN_KEYS if k in t} if isinstance(t, dict) else t for t in tops
        ]
    return known
