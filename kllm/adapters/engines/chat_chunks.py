"""OpenAI-style chat completion chunks (llama.cpp and any compatible server) to engine events."""

from __future__ import annotations

from typing import Any

from kllm.core.errors import EngineError
from processors.inference import Delta, Finish
from schemas import Usage


class ChunkReader:
    """Reads one stream's chunks: deltas as they come, the finish reason and usage at the end."""

    def __init__(self) -> None:
        self.finish_reason = "stop"
        self.usage = Usage()

    def deltas(self, chunk: dict[str, Any]) -> list[Delta]:
        if "error" in chunk:
            err = chunk["error"]
            raise EngineError(str(err.get("message", err) if isinstance(err, dict) else err))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        out = []
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                out.append(Delta(text))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return out

    def finish(self) -> Finish:
        return Finish(self.finish_reason, self.usage)
