"""OpenAI-style chat completion chunks (llama.cpp and any compatible server) to engine events."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kllm.core.errors import ContextLengthError, EngineError
from processors.inference import Delta, Finish
from schemas import Usage
from schemas.chat import TokenLogprob

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
            text = (choice.get("delta") or {}).get("content")
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

    def finish(self) -> Finish:
        return Finish(self.finish_reason, self.usage, tuple(self.logprobs))


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
