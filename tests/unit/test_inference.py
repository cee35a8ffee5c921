"""processors.inference: routing, streaming, deadlines, retries, fallback, breaker, cost.

Async code runs under asyncio.run (no pytest-asyncio); engines are the streaming
FakeEngine from conftest, so nothing here waits on a model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from processors import Rejected
from processors.inference import SAMPLING_FIELDS, Generator, Outcome, Price, Router
from schemas import (
    Generation,
    InferenceJob,
    Request,
    ResponseFormat,
    Sampling,
    TokenDelta,
    Tool,
    Usage,
)
from schemas.chat import FunctionSpec
from tests.unit.conftest import FakeEngine
from topics import GENERATIONS

MakeJob = Callable[..., InferenceJob]
MakeRequest = Callable[..., Request]


def _run(coro: Coroutine[Any, Any, Outcome]) -> Outcome:
    return asyncio.run(coro)


def _generator(*engines: FakeEngine, **kw: Any) -> Generator:
    """A generator over ``engines`` (the first is the default), with no backoff."""
    router_kw = {k: kw.pop(k) for k in ("aliases", "fallback", "failure_threshold") if k in kw}
    router = Router({e.model: e for e in engines}, default=engines[0].model, **router_kw)
    kw.setdefault("backoff_s", 0.0)
    return Generator(router, **kw)


def _generation(outcome: Outcome, job: InferenceJob) -> Generation:
    assert len(outcome.emits) == 1
    emit = outcome.emits[0]
    assert emit.topic is GENERATIONS
    assert emit.key == job.request.request_id
    assert isinstance(emit.message, Generation)
    assert emit.message.request == job.request
    assert emit.message.chunks == job.context.chunks
    return emit.message


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- success ------------------------------------------------------------------------------


def test_success(make_job: MakeJob) -> None:
    engine = FakeEngine(
        model="m",
        pieces=["Kafka ", "is ", "a log [1]."],
        finish_reason="length",
        usage=Usage(prompt_tokens=1000, completion_tokens=100),
    )
    gen = _generator(engine, prices={"m": Price(input_per_mtok=2.0, output_per_mtok=10.0)})
    job = make_job()
    outcome = _run(gen.run(job))
    assert outcome.failure is None
    g = _generation(outcome, job)
    assert g.text == "Kafka is a log [1]."
    assert g.model == "m"
    assert g.finish_reason == "length"
    assert g.usage == Usage(prompt_tokens=1000, completion_tokens=100)
    assert g.ttft_ms is not None
    assert 0 <= g.ttft_ms <= g.latency_ms
    assert g.latency_ms > 0
    assert g.attempts == 1
    assert g.cost_usd == pytest.approx(0.003)  # 1000 * 2.0 / 1e6 + 100 * 10.0 / 1e6
    assert g.error is None
    assert engine.calls == [(job.messages, 64)]


def test_unpriced_model_costs_nothing(make_job: MakeJob) -> None:
    engine = FakeEngine(usage=Usage(prompt_tokens=1000, completion_tokens=100))
    g = _generation(_run(_generator(engine).run(make_job())), make_job())
    assert g.cost_usd == 0.0


def test_max_tokens_from_request_or_default(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine()
    gen = _generator(engine, default_max_tokens=11)
    _run(gen.run(make_job()))
    _run(gen.run(make_job(make_request(max_tokens=300))))
    assert [m for _, m in engine.calls] == [11, 300]


def test_no_deltas_means_no_ttft(make_job: MakeJob) -> None:
    engine = FakeEngine(pieces=[])
    g = _generation(_run(_generator(engine).run(make_job())), make_job())
    assert g.text == ""
    assert g.ttft_ms is None
    assert g.finish_reason == "stop"


# --- streaming ----------------------------------------------------------------------------


def test_deltas_streamed_when_requested(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine(model="m", pieces=["a", "b", "c", "d"])
    deltas: list[TokenDelta] = []
    job = make_job(make_request(stream=True))
    g = _generation(_run(_generator(engine).run(job, deltas.append)), job)
    assert [d.index for d in deltas] == [0, 1, 2, 3, 4]
    assert [d.text for d in deltas] == ["a", "b", "c", "d", ""]
    assert all(d.request_id == "req-1" and d.model == "m" for d in deltas)
    assert "".join(d.text for d in deltas) == g.text
    # The last one closes the stream, with the generation's finish reason.
    assert [d.final for d in deltas] == [False] * 4 + [True]
    assert deltas[-1].finish_reason == g.finish_reason
    assert all(d.tenant == job.request.tenant for d in deltas)


def test_no_deltas_when_not_streaming(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine(pieces=["a", "b"])
    deltas: list[TokenDelta] = []
    job = make_job(make_request(stream=False))
    g = _generation(_run(_generator(engine).run(job, deltas.append)), job)
    assert deltas == []
    assert g.text == "ab"


def test_streaming_without_a_sink(make_job: MakeJob, make_request: MakeRequest) -> None:
    job = make_job(make_request(stream=True))
    g = _generation(_run(_generator(FakeEngine(pieces=["x"])).run(job, None)), job)
    assert g.text == "x"


# --- deadlines ----------------------------------------------------------------------------


def test_deadline_already_passed(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine()
    gen = _generator(engine, clock=FakeClock(2000.0))
    job = make_job(make_request(deadline_at=1999.0))
    outcome = _run(gen.run(job))
    g = _generation(outcome, job)
    assert g.finish_reason == "timeout"
    assert g.attempts == 0
    assert g.text == ""
    assert g.error is not None and "deadline" in g.error
    assert engine.calls == []
    assert outcome.failure is None  # a timeout is an answer, not a dead letter


def test_deadline_exactly_now_counts_as_passed(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    engine = FakeEngine()
    gen = _generator(engine, clock=FakeClock(2000.0))
    job = make_job(make_request(deadline_at=2000.0))
    g = _generation(_run(gen.run(job)), job)
    assert g.finish_reason == "timeout"
    assert engine.calls == []


def test_deadline_hit_mid_stream(make_job: MakeJob, make_request: MakeRequest) -> None:
    # The clock is frozen, so the engine gets exactly 50 ms of real time; it needs 10 s.
    engine = FakeEngine(pieces=["a", "b"], delay_s=5.0)
    gen = _generator(engine, clock=FakeClock(2000.0), max_attempts=3)
    deltas: list[TokenDelta] = []
    job = make_job(make_request(deadline_at=2000.05, stream=True))
    outcome = _run(gen.run(job, deltas.append))
    g = _generation(outcome, job)
    assert g.finish_reason == "timeout"
    assert g.attempts == 1
    assert g.error is not None and "deadline" in g.error
    assert len(engine.calls) == 1  # a timeout is not retried
    assert [(d.text, d.final, d.finish_reason) for d in deltas] == [("", True, "timeout")]
    assert outcome.failure is None


def test_future_deadline_does_not_interfere(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine(pieces=["a", "b"], delay_s=0.001)
    gen = _generator(engine, clock=FakeClock(2000.0))
    job = make_job(make_request(deadline_at=2060.0))
    g = _generation(_run(gen.run(job)), job)
    assert (g.finish_reason, g.text) == ("stop", "ab")


# --- retries ------------------------------------------------------------------------------


def test_retries_then_succeeds(make_job: MakeJob) -> None:
    engine = FakeEngine(fail_times=2)
    job = make_job()
    outcome = _run(_generator(engine, max_attempts=3).run(job))
    g = _generation(outcome, job)
    assert outcome.failure is None
    assert g.finish_reason == "stop"
    assert g.text == engine.text
    assert g.attempts == 3
    assert g.error is None
    assert len(engine.calls) == 3


def test_always_failing(make_job: MakeJob) -> None:
    engine = FakeEngine(model="m", always_fail=True)
    job = make_job()
    outcome = _run(_generator(engine, max_attempts=3).run(job))
    g = _generation(outcome, job)
    assert len(engine.calls) == 3
    assert g.finish_reason == "error"
    assert g.attempts == 3
    assert g.text == ""
    assert g.model == "m"
    assert outcome.failure is not None
    assert outcome.failure.startswith("engine failed after 3 attempts")
    for n in (1, 2, 3):
        assert f"m attempt {n}: out of memory (call {n})" in outcome.failure
    assert g.error == outcome.failure


def test_failure_after_a_streamed_delta_is_not_retried(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    engine = FakeEngine(pieces=["a", "b", "c"], fail_after=1)
    deltas: list[TokenDelta] = []
    job = make_job(make_request(stream=True))
    outcome = _run(_generator(engine, max_attempts=3).run(job, deltas.append))
    g = _generation(outcome, job)
    assert len(engine.calls) == 1
    assert [(d.index, d.text, d.final) for d in deltas] == [(0, "a", False), (1, "", True)]
    assert deltas[-1].finish_reason == "error"
    assert g.finish_reason == "error"
    assert g.attempts == 1
    assert outcome.failure is not None and "after 1 deltas" in outcome.failure


def test_failure_after_a_delta_is_retried_when_nothing_was_streamed(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    # Not streaming: nothing reached the tokens topic, so a restart is invisible.
    engine = FakeEngine(pieces=["a", "b"], fail_after=1)
    outcome = _run(_generator(engine, max_attempts=2).run(make_job(make_request(stream=False))))
    assert len(engine.calls) == 2
    assert outcome.failure is not None and "after 2 attempts" in outcome.failure


class FakeSleep:
    """Replaces asyncio.sleep: records each delay, advances ``clock``, yields once."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock
        self._real = asyncio.sleep
        self._thread = threading.get_ident()

    async def __call__(self, delay: float) -> None:
        if threading.get_ident() != self._thread:
            # Another thread's event loop (a server started by an end-to-end fixture in the
            # same session) sleeps for real and is not what the test counts.
            await self._real(delay)
            return
        self.delays.append(delay)
        if self.clock is not None:
            self.clock.now += delay
        await self._real(0)


@pytest.fixture
def fake_sleep(monkeypatch: pytest.MonkeyPatch) -> FakeSleep:
    sleep = FakeSleep()
    monkeypatch.setattr(asyncio, "sleep", sleep)
    return sleep


def test_backoff_doubles_between_attempts(make_job: MakeJob, fake_sleep: FakeSleep) -> None:
    engine = FakeEngine(fail_times=2)
    gen = _generator(engine, max_attempts=3, backoff_s=0.5, jitter=lambda: 1.0)  # no jitter
    _run(gen.run(make_job()))
    assert fake_sleep.delays == [0.5, 1.0]


def test_no_backoff_after_the_last_attempt(make_job: MakeJob, fake_sleep: FakeSleep) -> None:
    engine = FakeEngine(always_fail=True)
    gen = _generator(engine, max_attempts=3, backoff_s=0.5, jitter=lambda: 1.0)  # no jitter
    _run(gen.run(make_job()))
    assert fake_sleep.delays == [0.5, 1.0]


def test_no_retry_starts_after_the_deadline(
    make_job: MakeJob, make_request: MakeRequest, fake_sleep: FakeSleep
) -> None:
    clock = FakeClock(2000.0)
    fake_sleep.clock = clock  # the backoff takes (fake) time
    engine = FakeEngine(fail_times=1)
    gen = _generator(engine, max_attempts=3, backoff_s=1.0, clock=clock)
    job = make_job(make_request(deadline_at=2000.5))
    g = _generation(_run(gen.run(job)), job)
    assert g.finish_reason == "timeout"
    assert len(engine.calls) == 1


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Generator(Router({"m": FakeEngine(model="m")}, default="m"), max_attempts=0)


# --- routing and fallback ----------------------------------------------------------------


def test_fallback_after_primary_fails(make_job: MakeJob, make_request: MakeRequest) -> None:
    primary = FakeEngine(model="big", always_fail=True)
    backup = FakeEngine(model="small", pieces=["ok"])
    gen = _generator(
        primary,
        backup,
        fallback="small",
        max_attempts=2,
        prices={"small": Price(1.0, 1.0)},
    )
    job = make_job(make_request(model="big"))
    outcome = _run(gen.run(job))
    g = _generation(outcome, job)
    assert outcome.failure is None
    assert g.model == "small"
    assert g.text == "ok"
    assert g.attempts == 3  # two on the primary, one on the fallback
    assert g.cost_usd == pytest.approx((42 + 7) / 1e6)  # priced as the fallback
    assert len(primary.calls) == 2
    assert len(backup.calls) == 1


def test_fallback_also_failing(make_job: MakeJob) -> None:
    primary = FakeEngine(model="big", always_fail=True)
    backup = FakeEngine(model="small", always_fail=True, error="disk full")
    outcome = _run(_generator(primary, backup, fallback="small", max_attempts=2).run(make_job()))
    g = _generation(outcome, make_job())
    assert g.finish_reason == "error"
    assert g.attempts == 4
    assert outcome.failure is not None
    assert outcome.failure.startswith("engine failed after 4 attempts")
    assert "big attempt 2" in outcome.failure and "small attempt 2: disk full" in outcome.failure


def test_streamed_failure_is_not_restarted_on_the_fallback(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    primary = FakeEngine(model="big", pieces=["a", "b"], fail_after=1)
    backup = FakeEngine(model="small", pieces=["x", "y"])
    deltas: list[TokenDelta] = []
    job = make_job(make_request(stream=True))
    _run(_generator(primary, backup, fallback="small").run(job, deltas.append))
    assert [d.index for d in deltas] == list(range(len(deltas)))  # no index sent twice
    assert backup.calls == []


def test_unknown_model_rejected(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine(model="m")
    with pytest.raises(Rejected, match="'nope' is not served"):
        _run(_generator(engine, aliases={"fast": "m"}).run(make_job(make_request(model="nope"))))
    assert engine.calls == []


def test_alias_resolves(make_job: MakeJob, make_request: MakeRequest) -> None:
    default = FakeEngine(model="small")
    big = FakeEngine(model="big", pieces=["big answer"])
    gen = _generator(default, big, aliases={"best": "big"})
    job = make_job(make_request(model="best"))
    g = _generation(_run(gen.run(job)), job)
    assert g.model == "big"
    assert g.text == "big answer"
    assert default.calls == []
    assert gen.router.resolve("best") == "big"
    assert gen.router.resolve("big") == "big"
    assert gen.router.resolve(None) == "small"


def test_no_model_uses_default(make_job: MakeJob) -> None:
    default = FakeEngine(model="small")
    other = FakeEngine(model="big")
    g = _generation(_run(_generator(default, other).run(make_job())), make_job())
    assert g.model == "small"
    assert other.calls == []


# --- router -------------------------------------------------------------------------------


def _router(clock: FakeClock, **kw: Any) -> Router:
    engines = {"main": FakeEngine(model="main"), "backup": FakeEngine(model="backup")}
    return Router(
        engines, default="main", fallback="backup", failure_threshold=2, cooldown_s=10.0,
        clock=clock, **kw,
    )  # fmt: skip


def test_plan_without_fallback() -> None:
    router = Router({"m": FakeEngine(model="m")}, default="m")
    assert router.plan(None) == ["m"]
    router.record("m", ok=False)
    router.record("m", ok=False)
    router.record("m", ok=False)
    assert router.plan("m") == ["m"]


def test_plan_for_the_fallback_itself() -> None:
    router = _router(FakeClock())
    assert router.plan("backup") == ["backup"]


def test_breaker_opens_and_closes() -> None:
    clock = FakeClock()
    router = _router(clock)
    assert router.plan(None) == ["main", "backup"]
    router.record("main", ok=False)
    assert router.plan(None) == ["main", "backup"]  # one failure: below the threshold
    router.record("main", ok=False)
    assert router.is_open("main")
    assert router.plan(None) == ["backup", "main"]
    clock.now += 9.9
    assert router.plan("main") == ["backup", "main"]
    clock.now += 0.2  # cooldown over: the primary gets tried again
    assert not router.is_open("main")
    assert router.plan("main") == ["main", "backup"]
    router.record("main", ok=True)  # one success closes it
    router.record("main", ok=False)
    assert router.plan("main") == ["main", "backup"]


def test_breaker_counts_consecutive_failures_only() -> None:
    router = _router(FakeClock())
    router.record("main", ok=False)
    router.record("main", ok=True)
    router.record("main", ok=False)
    assert not router.is_open("main")
    assert router.plan(None) == ["main", "backup"]


def test_breaker_is_per_model() -> None:
    router = _router(FakeClock())
    router.record("backup", ok=False)
    router.record("backup", ok=False)
    assert router.is_open("backup")
    assert not router.is_open("main")
    assert router.plan("main") == ["main", "backup"]


def test_breaker_through_the_generator(make_job: MakeJob) -> None:
    clock = FakeClock()
    main = FakeEngine(model="main", always_fail=True)
    backup = FakeEngine(model="backup", pieces=["fine"])
    router = Router(
        {"main": main, "backup": backup},
        default="main",
        fallback="backup",
        failure_threshold=2,
        cooldown_s=10.0,
        clock=clock,
    )
    gen = Generator(router, max_attempts=1, backoff_s=0.0)
    for _ in range(2):
        g = _generation(_run(gen.run(make_job())), make_job())
        assert (g.model, g.attempts) == ("backup", 2)
    assert len(main.calls) == 2
    # Open: the fallback answers first and the primary is not called at all.
    g = _generation(_run(gen.run(make_job())), make_job())
    assert (g.model, g.attempts) == ("backup", 1)
    assert len(main.calls) == 2
    # Cooldown over: the primary is tried first again.
    clock.now += 11.0
    main.always_fail = False
    g = _generation(_run(gen.run(make_job())), make_job())
    assert (g.model, g.attempts) == ("main", 1)
    assert len(main.calls) == 3
    assert not router.is_open("main")
    assert router.plan(None) == ["main", "backup"]


@pytest.mark.parametrize(
    "kw",
    [
        {"default": "ghost"},
        {"default": "m", "fallback": "ghost"},
        {"default": "m", "aliases": {"fast": "ghost"}},
    ],
)
def test_router_rejects_unserved_targets(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'ghost' is routed to but not served"):
        Router({"m": FakeEngine(model="m")}, **kw)


def test_resolve_lists_what_is_served() -> None:
    router = Router({"m": FakeEngine(model="m")}, default="m", aliases={"fast": "m"})
    with pytest.raises(Rejected) as info:
        router.resolve("x")
    assert "['fast', 'm']" in info.value.reason


# --- price --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        (Price(2.0, 10.0), Usage(prompt_tokens=1000, completion_tokens=100), 0.003),
        (Price(2.0, 10.0), Usage(), 0.0),
        (Price(), Usage(prompt_tokens=10**6, completion_tokens=10**6), 0.0),
        (Price(0.5, 0.0), Usage(prompt_tokens=2 * 10**6, completion_tokens=5), 1.0),
        (Price(0.0, 15.0), Usage(prompt_tokens=7, completion_tokens=10**6), 15.0),
    ],
)
def test_price_cost(price: Price, usage: Usage, expected: float) -> None:
    assert price.cost(usage) == pytest.approx(expected)


# --- what a request asks of the engine -----------------------------------------------------


def test_sampling_and_format_reach_the_engine(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine()
    sampling = Sampling(temperature=0.8, seed=3, stop=["\n\n"])
    json_mode = ResponseFormat(type="json_object")
    job = make_job(make_request(sampling=sampling, response_format=json_mode))
    _generation(_run(_generator(engine).run(job)), job)
    (options,) = engine.options
    assert options.fields() == {
        "temperature": 0.8,
        "seed": 3,
        "stop": ["\n\n"],
        "response_format": {"type": "json_object"},
    }


def test_unset_fields_are_left_to_the_engine(make_job: MakeJob) -> None:
    engine = FakeEngine()
    _run(_generator(engine).run(make_job()))
    assert engine.options[0].fields() == {}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"tools": [Tool(function=FunctionSpec(name="f"))]}, "tools"),
        ({"response_format": ResponseFormat(type="json_object")}, "response_format"),
    ],
)
def test_a_field_the_engine_cannot_honour_is_refused_by_name(
    make_job: MakeJob, make_request: MakeRequest, change: dict[str, Any], field: str
) -> None:
    engine = FakeEngine(honours=SAMPLING_FIELDS)
    with pytest.raises(Rejected, match=f"^{field}: the fake-model engine cannot honour it"):
        _run(_generator(engine).run(make_job(make_request(**change))))
    assert engine.calls == []  # never dropped: not run at all


def test_a_fallback_that_cannot_honour_the_request_is_skipped(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    primary = FakeEngine(model="p", always_fail=True)
    plain = FakeEngine(model="plain", honours=SAMPLING_FIELDS)
    job = make_job(make_request(response_format=ResponseFormat(type="json_object")))
    outcome = _run(_generator(primary, plain, fallback="plain", max_attempts=1).run(job))
    assert outcome.failure is not None
    assert plain.calls == []


def test_a_fallback_answer_says_so(make_job: MakeJob) -> None:
    primary = FakeEngine(model="p", always_fail=True)
    spare = FakeEngine(model="spare")
    job = make_job()
    gen = _generation(_run(_generator(primary, spare, fallback="spare").run(job)), job)
    assert (gen.model, gen.fallback) == ("spare", True)
    assert not _generation(_run(_generator(spare).run(job)), job).fallback


def test_n_choices_are_drawn_side_by_side(make_job: MakeJob, make_request: MakeRequest) -> None:
    engine = FakeEngine()
    job = make_job(make_request(n=3, sampling=Sampling(temperature=1.0, seed=5)))
    gen = _generation(_run(_generator(engine).run(job)), job)
    assert gen.text == engine.text
    assert [(c.index, c.text) for c in gen.alternatives] == [(1, engine.text), (2, engine.text)]
    assert [o.sampling.seed for o in engine.options] == [5, 6, 7]  # differ, and repeat
    assert gen.usage == Usage(prompt_tokens=42, completion_tokens=21)  # prompt billed once


def test_a_streamed_request_for_several_choices_is_refused(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    with pytest.raises(Rejected, match=r"^n: a streamed answer has one choice"):
        _run(_generator(FakeEngine()).run(make_job(make_request(n=2, stream=True))))


def test_a_streamed_request_for_log_probabilities_is_refused(
    make_job: MakeJob, make_request: MakeRequest
) -> None:
    with pytest.raises(Rejected, match=r"^logprobs: given for answers that are not streamed"):
        _run(_generator(FakeEngine()).run(make_job(make_request(logprobs=True, stream=True))))
