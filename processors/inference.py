"""Inference: route a job to an engine, stream it, retry, and describe the result.

The engine streams; this module decides which engine (model routing with a
fallback and a circuit breaker), enforces the request's deadline, retries
engine errors a bounded number of times (exponential backoff with jitter, so
workers retrying together do not hit a recovering engine together), prices the
usage, and produces the generation. A prompt too long for the model's context is
the caller's error: not retried, not counted against the model's breaker, and
the generation's finish reason says so (``context_length``: a 400 to the caller).
It knows nothing of Kafka: deltas go to a callback, outputs come back as
:class:`Emit` values.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kllm.core.errors import ContextLengthError, EngineError
from processors.base import Emit, Outcome, Rejected
from schemas import Generation, InferenceJob, Request, TokenDelta, Usage
from schemas.chat import (
    ChatTurn,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
)
from schemas.messages import Choice
from topics import GENERATIONS, TOKENS


@dataclass(frozen=True)
class Delta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of a stream: why it stopped, what it used, (when asked for) each
    token's log probability, and the tool calls it made."""

    finish_reason: str
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    """The caller's tools the model called (then ``finish_reason`` is "tool_calls")."""


EngineEvent = Delta | Finish

SAMPLING_FIELDS = frozenset(
    {"temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty"}
)
"""What every engine here honours, beside the messages and max_tokens."""


@dataclass(frozen=True)
class Options:
    """What a request asks of the engine beyond its messages and token budget."""

    sampling: Sampling = field(default_factory=Sampling)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None

    @classmethod
    def of(cls, request: Request) -> Options:
        return cls(
            request.sampling,
            request.response_format,
            request.logprobs,
            request.top_logprobs,
            tuple(request.tools),
            request.tool_choice,
        )

    def fields(self) -> dict[str, Any]:
        """The OpenAI body fields these options set (unset ones are left to the engine)."""
        body: dict[str, Any] = self.sampling.model_dump(exclude_defaults=True)
        if self.response_format is not None and self.response_format.json_mode():
            body["response_format"] = self.response_format.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        if self.logprobs:
            body["logprobs"] = True
        if self.top_logprobs:
            body["top_logprobs"] = self.top_logprobs
        if self.tools:
            body["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
        return body


NO_OPTIONS = Options()


class Engine(Protocol):
    """A streaming generation engine. Raises :class:`EngineError` when it fails."""

    model: str
    slots: int
    """How many requests it serves at once (continuous batching slots)."""
    honours: frozenset[str]
    """The request fields (OpenAI's names) it can do; a request asking another is refused."""

    def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]: ...


def asked_fields(request: Request) -> list[str]:
    """The request's fields that an engine must honour, by their OpenAI names (``n``
    is the generator's own: it runs the engine n times)."""
    return list(Options.of(request).fields())


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, usage: Usage) -> float:
        return (
            usage.prompt_tokens * self.input_per_mtok
            + usage.completion_tokens * self.output_per_mtok
        ) / 1e6


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


@dataclass
class Router:
    """Maps a requested model or alias to the engines to try, in order.

    After ``failure_threshold`` consecutive failed requests a model's breaker
    opens for ``cooldown_s``: its requests go to the fallback first. When the
    cooldown ends the model is tried again (one success closes the breaker).
    """

    engines: Mapping[str, Engine]
    default: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    fallback: str | None = None
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _breakers: dict[str, _Breaker] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for name in (self.default, self.fallback, *self.aliases.values()):
            if name is not None and name not in self.engines:
                raise ValueError(f"model {name!r} is routed to but not served")

    def resolve(self, requested: str | None) -> str:
        if requested is None:
            return self.default
        name = self.aliases.get(requested, requested)
        if name not in self.engines:
            served = sorted({*self.engines, *self.aliases})
            raise Rejected(f"model {requested!r} is not served here (served: {served})")
        return name

    def plan(self, requested: str | None) -> list[str]:
        primary = self.resolve(requested)
        if self.fallback is None or self.fallback == primary:
            return [primary]
        if self.is_open(primary):
            return [self.fallback, primary]
        return [primary, self.fallback]

    def is_open(self, model: str) -> bool:
        return self._breakers.get(model, _Breaker()).open_until > self.clock()

    def record(self, model: str, ok: bool) -> None:
        b = self._breakers.setdefault(model, _Breaker())
        if ok:
            b.failures, b.open_until = 0, 0.0
            return
        b.failures += 1
        if b.failures >= self.failure_threshold:
            b.open_until = self.clock() + self.cooldown_s


class DeadlineExceeded(Exception):
    pass


DeltaSink = Callable[[TokenDelta], None]


def stream_context(request: Request, *, first: bool) -> dict[str, Any]:
    """What moderation needs on each delta to judge a stream without the request."""
    return {
        "tenant": request.tenant,
        "template": request.template,
        "injection_flagged": request.flagged,
        "prompt": request.prompt if first and request.flagged else None,
        "instructions": request.instructions() if first else None,
    }


class Generator:
    def __init__(
        self,
        router: Router,
        prices: Mapping[str, Price] | None = None,
        default_max_tokens: int = 64,
        max_attempts: int = 3,
        backoff_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.router = router
        self.prices = dict(prices or {})
        self.default_max_tokens = default_max_tokens
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.clock = clock
        self.jitter = jitter
        """A number in [0, 1): each backoff is between half and all of its exponential step."""

    async def handle(self, job: InferenceJob, publish: Callable[[Emit], None]) -> Outcome:
        """Generate for ``job``, publishing a streamed request's deltas to the tokens topic
        as they come (the in-flight runner's shape)."""
        return await self.run(job, on_delta=lambda d: publish(Emit(TOKENS, d.request_id, d)))

    async def run(self, job: InferenceJob, on_delta: DeltaSink | None = None) -> Outcome:
        """Generate for ``job``; raises :class:`Rejected` for a model nobody serves.
        A streamed request's deltas end with a final one carrying the finish reason,
        however the generation ended, so moderation can close the caller's stream."""
        if on_delta is None or not job.request.stream:
            return await self._run(job, None)
        count = [0]

        def counted(delta: TokenDelta) -> None:
            count[0] += 1
            on_delta(delta)

        outcome = await self._run(job, counted)
        generation = next(
            (e.message for e in outcome.emits if isinstance(e.message, Generation)), None
        )
        on_delta(
            TokenDelta(
                request_id=job.request.request_id,
                index=count[0],
                text="",
                model=generation.model if generation else "",
                final=True,
                finish_reason=generation.finish_reason if generation else "error",
                **stream_context(job.request, first=count[0] == 0),
            )
        )
        return outcome

    async def _run(self, job: InferenceJob, on_delta: DeltaSink | None) -> Outcome:
        request = job.request
        plan = self._capable(self.router.plan(request.model), request)
        errors: list[str] = []
        attempts = 0
        for model in plan:
            engine = self.router.engines[model]
            for attempt in range(self.max_attempts):
                if self._late(request):
                    when = "before generation started" if attempts == 0 else "before a retry"
                    return self._failed(job, model, "timeout", f"deadline passed {when}", attempts)
                attempts += 1
                sent = [0]
                try:
                    gen = await self._attempt(engine, job, on_delta, sent)
                except DeadlineExceeded:
                    return self._failed(
                        job, model, "timeout", "deadline passed during generation", attempts
                    )
                except ContextLengthError:
                    # The request's fault, the same on every retry and every model's
                    # breaker: no retry, no fallback, nothing recorded against the model.
                    reason = "the prompt does not fit the model's context window"
                    return self._failed(job, model, "context_length", reason, attempts)
                except EngineError as exc:
                    errors.append(f"{model} attempt {attempt + 1}: {exc}")
                    if sent[0]:
                        # Deltas already reached the tokens topic: a restart, here or on the
                        # fallback, would send the text twice. Answer with the error instead.
                        self.router.record(model, ok=False)
                        return self._exhausted(job, model, attempts, errors)
                    if attempt + 1 < self.max_attempts:
                        await asyncio.sleep(self._backoff(request, attempt))
                    continue
                self.router.record(model, ok=True)
                fallback = model != self.router.resolve(request.model)
                done = gen.model_copy(update={"attempts": attempts, "fallback": fallback})
                return Outcome([Emit(GENERATIONS, request.request_id, done)])
            self.router.record(model, ok=False)
        return self._exhausted(job, plan[-1], attempts, errors)

    def _capable(self, plan: list[str], request: Request) -> list[str]:
        """The plan's models that can honour every field the request asks; Rejected,
        naming the field, when the first choice cannot (a field is never dropped)."""
        if request.n > 1 and request.stream:
            raise Rejected("n: a streamed answer has one choice; ask for n > 1 without stream")
        if request.logprobs and request.stream:
            # Moderation cuts a stream into windows of its own: tokens would not line up.
            raise Rejected("logprobs: given for answers that are not streamed")
        if request.logprobs and request.tools:
            # A tool call's tokens are not the text returned: they would not line up either.
            raise Rejected("logprobs: given for answers to requests without tools")
        asked = asked_fields(request)
        for name in asked:
            if name not in self.router.engines[plan[0]].honours:
                raise Rejected(f"{name}: the {plan[0]} engine cannot honour it")
        return [m for m in plan if set(asked) <= self.router.engines[m].honours]

    def _late(self, request: Request) -> bool:
        return request.deadline_at is not None and self.clock() >= request.deadline_at

    def _backoff(self, request: Request, attempt: int) -> float:
        delay = self.backoff_s * 2.0**attempt * (0.5 + 0.5 * self.jitter())
        if request.deadline_at is not None:
            delay = min(delay, max(0.0, request.deadline_at - self.clock()))
        return delay

    def _exhausted(
        self, job: InferenceJob, model: str, attempts: int, errors: list[str]
    ) -> Outcome:
        reason = f"engine failed after {attempts} attempts: " + "; ".join(errors)
        return Outcome(self._failed(job, model, "error", reason, attempts).emits, failure=reason)

    async def _attempt(
        self, engine: Engine, job: InferenceJob, on_delta: DeltaSink | None, sent: list[int]
    ) -> Generation:
        """One generation of every choice the request asks for (``n``), side by side on
        the engine's slots; only the first streams."""
        request = job.request
        remaining = None if request.deadline_at is None else request.deadline_at - self.clock()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(remaining):
                drawn = await asyncio.gather(
                    self._choice(engine, job, 0, on_delta, sent, t0),
                    *(self._choice(engine, job, i, None, [0], t0) for i in range(1, request.n)),
                )
        except TimeoutError as exc:
            raise DeadlineExceeded from exc
        (text, finish, ttft_ms), rest = drawn[0], drawn[1:]
        usage = Usage(
            prompt_tokens=finish.usage.prompt_tokens,  # the prompt is read once per choice,
            completion_tokens=sum(f.usage.completion_tokens for _, f, _ in drawn),
        )  # but billed once, as OpenAI does
        price = self.prices.get(engine.model, Price())
        return Generation(
            request=request,
            chunks=job.context.chunks,
            text=text,
            model=engine.model,
            finish_reason=finish.finish_reason,
            usage=usage,
            latency_ms=(time.perf_counter() - t0) * 1000,
            ttft_ms=ttft_ms,
            cost_usd=price.cost(usage),
            logprobs=list(finish.logprobs),
            tool_calls=list(finish.tool_calls),
            alternatives=[
                Choice(
                    index=i, text=t, finish_reason=f.finish_reason, tool_calls=list(f.tool_calls)
                )
                for i, (t, f, _) in enumerate(rest, start=1)
            ],
        )

    async def _choice(
        self,
        engine: Engine,
        job: InferenceJob,
        index: int,
        on_delta: DeltaSink | None,
        sent: list[int],
        t0: float,
    ) -> tuple[str, Finish, float | None]:
        """Choice ``index``'s text, how it ended, and its time to first token. A seeded
        request's choices draw with seeds one apart, so they differ and repeat."""
        request = job.request
        max_tokens = request.max_tokens or self.default_max_tokens
        options = Options.of(request)
        if index and request.sampling.seed is not None:
            seed = request.sampling.seed + index
            options = replace(options, sampling=request.sampling.model_copy(update={"seed": seed}))
        ttft_ms: float | None = None
        parts: list[str] = []
        finish = Finish("stop", Usage())
        async for event in engine.stream(job.messages, max_tokens, options):
            if isinstance(event, Finish):
                finish = event
                continue
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - t0) * 1000
            parts.append(event.text)
            if on_delta is not None and request.stream:
                on_delta(
                    TokenDelta(
                        request_id=request.request_id,
                        index=sent[0],
                        text=event.text,
                        model=engine.model,
                        **stream_context(request, first=sent[0] == 0),
                    )
                )
                sent[0] += 1
        return "".join(parts), finish, ttft_ms

    def _failed(
        self, job: InferenceJob, model: str, finish_reason: str, error: str, attempts: int
    ) -> Outcome:
        generation = Generation(
            request=job.request,
            chunks=job.context.chunks,
            text="",
            model=model,
            finish_reason=finish_reason,
            attempts=attempts,
            error=error,
        )
        return Outcome([Emit(GENERATIONS, job.request.request_id, generation)])
