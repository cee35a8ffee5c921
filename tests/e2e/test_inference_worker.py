"""The inference worker alone, with the real xllamacpp engine, through a real broker.

Each test has a broker of its own, so its workers are the only members of their
group: Tansu can keep a group rebalancing for minutes after a member that was
still joining goes away, which would leak from one test into the next.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from kllm.ops.broker import EmbeddedBroker, free_port
from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin, TailReader, make_producer
from schemas import (
    DeadLetter,
    Generation,
    InferenceJob,
    Request,
    RetrievalContext,
    TokenDelta,
    decode,
    encode,
)
from schemas.chat import ChatTurn
from tests.e2e.conftest import CONSUMER, FAST_GROUPS, Replies, collect, embedded_broker, wait_until
from topics import GENERATIONS, INFERENCE, TOKENS, declared, inference_topic, provision

CAPACITY = 4
WORKER_ENV = {
    **FAST_GROUPS,
    "KLLM_MAX_IN_FLIGHT": str(CAPACITY),
    "KLLM_N_CTX_PER_SLOT": "512",  # small, so an over-long prompt is a real engine error
    "KLLM_MAX_ATTEMPTS": "3",
}


@pytest.fixture()
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with embedded_broker(tmp_path_factory.mktemp("wbroker") / "broker.log") as b:
        provision(ConfluentTopicAdmin(b.bootstrap), declared())
        yield b


def start_workers(
    broker: EmbeddedBroker, run_dir: Path, n: int, extra: dict[str, str] | None = None
) -> Supervisor:
    env = {
        "KLLM_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KLLM_RUN_DIR": str(run_dir),
        **WORKER_ENV,
        **(extra or {}),
    }
    sup = Supervisor(run_dir, env, replicas={"inference": n}, stages=("inference",))
    sup.start_all()
    sup.wait_ready(120, bootstrap=broker.bootstrap)
    return sup


def job(prompt: str, max_tokens: int = 8, **request: object) -> InferenceJob:
    rid = f"w-{uuid.uuid4()}"
    req = Request(request_id=rid, prompt=prompt, max_tokens=max_tokens, **request)  # type: ignore[arg-type]
    return InferenceJob(
        request=req,
        context=RetrievalContext(request_id=rid),
        messages=[ChatTurn(role="user", content=prompt)],
    )


class Jobs:
    def __init__(self, broker: EmbeddedBroker) -> None:
        self.bootstrap = broker.bootstrap
        self.producer = make_producer(broker.bootstrap)

    def tail(self, topic: object) -> Replies:
        return Replies(TailReader(self.bootstrap, topic.name, CONSUMER))  # type: ignore[attr-defined]

    def send(self, jobs: list[InferenceJob]) -> set[str]:
        for j in jobs:
            self.producer.produce(INFERENCE.name, key=j.request.request_id, value=encode(j))
        self.producer.flush(10)
        return {j.request.request_id for j in jobs}


def generations(replies: Replies, ids: set[str], timeout_s: float) -> dict[str, Generation]:
    return {k: decode(v, Generation) for k, v in collect(replies, ids, timeout_s).items()}


def max_in_flight_logged(sup: Supervisor) -> int:
    peak = 0
    for sp in sup.procs:
        for line in sp.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"completed"' in line:
                peak = max(peak, orjson.loads(line)["max_in_flight"])
    return peak


def test_fifty_concurrent_requests_answered_within_capacity(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    sup = start_workers(broker, tmp_path, 1)
    jobs = Jobs(broker)
    out = jobs.tail(GENERATIONS)
    try:
        ids = jobs.send([job(f"Say one word about the number {i}.") for i in range(50)])
        got = generations(out, ids, 240)
    finally:
        out.close()
        sup.stop_all()
    assert set(got) == ids
    assert all(g.error is None and g.text.strip() for g in got.values())
    assert all(0 < g.usage.completion_tokens <= 8 for g in got.values())
    assert all(g.ttft_ms is not None and g.ttft_ms <= g.latency_ms for g in got.values())
    # The engine was kept full, and never overfilled.
    assert max_in_flight_logged(sup) == CAPACITY


def test_kill_9_of_a_worker_mid_load_loses_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    sup = start_workers(broker, tmp_path, 2)
    jobs = Jobs(broker)
    out = jobs.tail(GENERATIONS)
    try:
        ids = jobs.send([job(f"Name a colour, request {i}.", max_tokens=12) for i in range(40)])
        # Kill once some answers are out, so that others are in flight.
        wait_until(lambda: len(collect(out, ids, 0.5)) >= 8, 120, "8 of 40 generations", 0)
        sup.kill("inference", 0)  # SIGKILL with requests in flight
        # The survivor takes over the dead worker's partitions once its session expires.
        got = generations(out, ids, 240)
        sup.restart_crashed()
        sup.wait_ready(120, bootstrap=broker.bootstrap)
        more = jobs.send([job("One more after the restart.")])
        got |= generations(out, more, 120)
    finally:
        out.close()
        sup.stop_all()
    assert set(got) == ids | more, f"lost: {(ids | more) - set(got)}"


def test_streamed_deltas_add_up_to_the_generation(broker: EmbeddedBroker, tmp_path: Path) -> None:
    sup = start_workers(broker, tmp_path, 1)
    jobs = Jobs(broker)
    gens, toks = jobs.tail(GENERATIONS), jobs.tail(TOKENS)
    try:
        j = job("Count from one to five.", max_tokens=16, stream=True)
        rid = jobs.send([j]).pop()
        gen = generations(gens, {rid}, 120)[rid]
        deltas: list[TokenDelta] = []
        for key, value in toks.reader.records(5):
            if key == rid:
                deltas.append(decode(value, TokenDelta))
            if len(deltas) == gen.usage.completion_tokens:
                break
    finally:
        gens.close()
        toks.close()
        sup.stop_all()
    assert deltas, "no deltas on the tokens topic"
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert "".join(d.text for d in deltas) == gen.text


def test_deadlines_and_engine_errors(broker: EmbeddedBroker, tmp_path: Path) -> None:
    sup = start_workers(broker, tmp_path, 1)
    jobs = Jobs(broker)
    gens, dlq = jobs.tail(GENERATIONS), jobs.tail(INFERENCE.dlq)
    try:
        late = job("Too late.", deadline_at=time.time() - 1)
        slow = job(
            "Write a long story about a dragon.", max_tokens=400, deadline_at=time.time() + 1.5
        )
        too_long = job("word " * 900)  # over the 512-token context of a slot: the engine refuses it
        ok = job("Say hello.")
        ids = jobs.send([late, slow, too_long, ok])
        got = generations(gens, ids, 180)
        letters = {
            k: decode(v, DeadLetter)
            for k, v in collect(dlq, {too_long.request.request_id}, 60).items()
        }
    finally:
        gens.close()
        dlq.close()
        sup.stop_all()
    g_late = got[late.request.request_id]
    assert (g_late.finish_reason, g_late.attempts, g_late.usage.completion_tokens) == (
        "timeout",
        0,
        0,
    )
    assert "deadline passed" in (g_late.error or "")
    g_slow = got[slow.request.request_id]
    assert g_slow.finish_reason == "timeout" and "during generation" in (g_slow.error or "")
    g_long = got[too_long.request.request_id]
    # The caller's to fix: answered at once (400 at the gateway), not retried, and not
    # dead-lettered as a failure of the pipeline.
    assert g_long.finish_reason == "context_length" and g_long.attempts == 1
    assert "context window" in (g_long.error or "")
    assert too_long.request.request_id not in letters
    assert got[ok.request.request_id].error is None


def test_a_pool_has_its_own_topic_and_group(broker: EmbeddedBroker, tmp_path: Path) -> None:
    provision(ConfluentTopicAdmin(broker.bootstrap), declared(["alt"]))
    env = {"KLLM_POOL": "alt", "KLLM_MODELS": '[{"name": "alt-model", "slots": 2}]'}
    sup = start_workers(broker, tmp_path, 1, env)
    jobs = Jobs(broker)
    out = jobs.tail(GENERATIONS)
    try:
        j = job("Say hello.")
        jobs.producer.produce(
            inference_topic("alt").name, key=j.request.request_id, value=encode(j)
        )
        jobs.producer.flush(10)
        got = generations(out, {j.request.request_id}, 120)
    finally:
        out.close()
        sup.stop_all()
    assert got[j.request.request_id].model == "alt-model"


@pytest.fixture()
def llama_server(tmp_path: Path) -> Iterator[str]:
    """llama.cpp's own OpenAI-compatible HTTP server (what xllamacpp embeds), on loopback."""
    code = (
        "import time; from kllm.adapters.engines.xllama import XLlamaEngine\n"
        "e = XLlamaEngine(n_parallel=2)\n"
        "print(e.http_address, flush=True)\n"
        "time.sleep(600)\n"  # keeps the server up; the fixture ends the process
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def test_http_engine_against_a_real_llama_cpp_server(
    broker: EmbeddedBroker, tmp_path: Path, llama_server: str
) -> None:
    models = [
        {
            "name": "remote",
            "engine": "openai",
            "url": llama_server,
            "slots": 2,
            "input_price_per_mtok": 1.0,
            "output_price_per_mtok": 2.0,
        }
    ]
    sup = start_workers(broker, tmp_path, 1, {"KLLM_MODELS": orjson.dumps(models).decode()})
    jobs = Jobs(broker)
    out = jobs.tail(GENERATIONS)
    try:
        ids = jobs.send([job(f"Name a fruit, {i}.") for i in range(4)])
        got = generations(out, ids, 120)
    finally:
        out.close()
        sup.stop_all()
    assert set(got) == ids
    for g in got.values():
        assert g.model == "remote" and g.text.strip() and g.error is None
        expected = (g.usage.prompt_tokens * 1.0 + g.usage.completion_tokens * 2.0) / 1e6
        assert g.cost_usd == pytest.approx(expected) and g.cost_usd > 0


def test_fallback_when_the_named_model_fails(broker: EmbeddedBroker, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    models = [{"name": "remote", "engine": "openai", "url": dead}, {"name": "local", "slots": 2}]
    env = {
        "KLLM_MODELS": orjson.dumps(models).decode(),
        "KLLM_DEFAULT_MODEL": "remote",
        "KLLM_FALLBACK_MODEL": "local",
    }
    sup = start_workers(broker, tmp_path, 1, env)
    jobs = Jobs(broker)
    out = jobs.tail(GENERATIONS)
    try:
        j = job("Say hello.")
        got = generations(out, jobs.send([j]), 120)
    finally:
        out.close()
        sup.stop_all()
    g = got[j.request.request_id]
    assert (g.model, g.error, g.attempts) == ("local", None, 4)  # 3 refused, then the fallback
