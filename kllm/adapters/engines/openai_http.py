"""Any OpenAI-compatible chat completions server (vLLM, llama.cpp server, ...) over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson

from kllm.adapters.engines.chat_chunks import ChunkReader
from kllm.core.errors import EngineError
from processors.inference import EngineEvent
from schemas.messages import ChatTurn


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
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, limits=limits
        )

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int
    ) -> AsyncIterator[EngineEvent]:
        body = {
            "model": self.served_name,
            "messages": [m.model_dump() for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reader = ChunkReader()
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread())[:300].decode(errors="replace")
                    raise EngineError(f"HTTP {resp.status_code} from {resp.url}: {detail}")
                async for line in resp.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is None:
                        continue
                    for delta in reader.deltas(chunk):
                        yield delta
        except httpx.HTTPError as exc:
            raise EngineError(
                f"{type(exc).__name__} talking to {self._client.base_url}: {exc}"
            ) from exc
        yield reader.finish()

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
        raise EngineError(f"unreadable stream chunk: {data[:200]}") from exc
    return chunk if isinstance(chunk, dict) else None
