"""Any OpenAI-compatible chat completions server (vLLM, llama.cpp server, ...) over HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson

from kllm.adapters.engines.chat_chunks import ChunkReader, about_context
from kllm.core.errors import ContextLengthError, EngineError
from processors.inference import NO_OPTIONS, SAMPLING_FIELDS, EngineEvent, Options
from schemas.chat import ChatTurn

log = logging.getLogger(__name__)


class OpenAIHttpEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        served_name: str | None = None,
        api_key: str = "",
        slots: int = 64,
        temperature: float = 0.0,
        timeout_s: float = 120.0,
    ) -> None:
        self.model = model
        """The name this pipeline routes by."""
        self.served_name = served_name or model
        """The name the server knows the model by."""
        self.slots = slots
        # What the pipeline passes on; the server behind may still refuse (a 400).
        self.honours = SAMPLING_FIELDS | {
            "response_format",
            "logprobs",
            "top_logprobs",
            "tools",
            "tool_choice",
        }
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, limits=limits
        )

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]:
        body = {
            "model": self.served_name,
            "messages": [m.wire() for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            **options.fields(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reader = ChunkReader()
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise await self._refused(resp)
                async for line in resp.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is None:
                        continue
                    for delta in reader.deltas(chunk):
                        yield delta
        except httpx.HTTPError as exc:
            # The address goes to this stage's log, not into the error: error texts
            # travel on (the DLQ, the response) and must not map the internal network.
            log.warning(
                "engine unreachable",
                extra={"engine": self.model, "url": str(self._client.base_url), "error": str(exc)},
            )
            raise EngineError(f"{type(exc).__name__} talking to the {self.model} engine") from exc
        yield reader.finish()

    async def _refused(self, resp: httpx.Response) -> EngineError:
        """A non-200 answer as an error that quotes nothing of its body (which may
        echo the prompt or name internals); too long a prompt is told apart."""
        body = (await resp.aread())[:2000].decode(errors="replace")
        if resp.status_code in (400, 413, 422) and about_context(body):
            return ContextLengthError("the prompt does not fit the model's context window")
        log.warning("engine refused", extra={"engine": self.model, "status": resp.status_code})
        return EngineError(f"HTTP {resp.status_code} from the {self.model} engine")

    async def aclose(self) -> None:
        await self._client.aclose()


def _sse_data(line: str) -> dict[str, Any] | None:
    """The JSON of one server-sent ``data:`` line; None for keep-alives and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EngineError(f"unreadable stream chunk of {len(data)} characters") from exc
    return chunk if isinstance(chunk, dict) else None
