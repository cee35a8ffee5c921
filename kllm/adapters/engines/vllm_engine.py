"""vLLM in-process: its async engine on a local GPU (the optional `gpu` extra).

Untested on the CPU-only machines this project is developed on; the worker
code around it is the same as for the CPU engine, so only this adapter is
specific to vLLM. To run vLLM as a separate server instead, use the
OpenAI-compatible HTTP engine (a KLLM_MODELS entry with "engine": "openai").
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kllm.adapters.engines.chat_chunks import about_context
from kllm.core.errors import ConfigError, ContextLengthError, EngineError
from processors.inference import NO_OPTIONS, SAMPLING_FIELDS, Delta, EngineEvent, Finish, Options
from schemas import Usage
from schemas.chat import ChatTurn


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        model_name: str,
        max_num_seqs: int = 128,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        temperature: float = 0.0,
    ) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise ConfigError(
                "vLLM is not installed: pip install 'kllm[gpu]' on a GPU machine"
            ) from exc
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=model_name,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        self.model = model_name
        self.slots = max_num_seqs
        # Structured output is not wired to vLLM's guided decoding yet: refused, not dropped.
        self.honours = SAMPLING_FIELDS
        self.temperature = temperature
        self._engine = AsyncLLMEngine.from_engine_args(args)
        self._tokenizer: Any = None
        self._ids = itertools.count()

    async def _prompt(self, messages: Sequence[ChatTurn]) -> str:
        if self._tokenizer is None:
            self._tokenizer = await self._engine.get_tokenizer()
        return str(
            self._tokenizer.apply_chat_template(
                [m.wire() for m in messages], tokenize=False, add_generation_prompt=True
            )
        )

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]:
        from vllm import SamplingParams

        asked = options.sampling.model_dump(exclude_defaults=True)
        params = SamplingParams(
            max_tokens=max_tokens, **({"temperature": self.temperature} | asked)
        )
        request_id = f"kllm-{next(self._ids)}"
        seen = 0
        last: Any = None
        try:
            async for out in self._engine.generate(
                await self._prompt(messages), params, request_id
            ):
                last = out
                text = out.outputs[0].text  # cumulative: send what is new
                if len(text) > seen:
                    yield Delta(text[seen:])
                    seen = len(text)
        except Exception as exc:
            if about_context(str(exc)):  # "... longer than the maximum model length of N"
                raise ContextLengthError("the prompt does not fit the model's context") from exc
            raise EngineError(f"vLLM: {exc}") from exc
        finally:
            if last is None or not last.finished:
                await self._engine.abort(request_id)  # a cancelled job frees its sequence
        if last is None:
            raise EngineError("vLLM returned no output")
        completion = last.outputs[0]
        yield Finish(
            str(completion.finish_reason or "stop"),
            Usage(
                prompt_tokens=len(last.prompt_token_ids or []),
                completion_tokens=len(completion.token_ids),
            ),
        )
