"""One record's failure is that record's: the micro-batch runner over the retrieval
processors, on in-memory doubles (kllm.testing.kafka) and the unit fakes.

Unknown template versions, store and embedder errors and oversized jobs dead-letter
(and answer) their own request; a dependency that fails every record is an outage, and
its records are read again later instead of being dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kllm.core.errors import PipelineError, StoreError
from kllm.runtime.batch import BatchRunner, isolated
from kllm.runtime.settings import PROMPTS_DIR
from kllm.testing.kafka import FakeConsumer, FakeProducer
from processors.batching import DOWN_AFTER, Failed, each, isolate
from processors.retrieval import PUBLIC_TENANT, EmbedderError, Retriever, StoredChunk
from processors.templates import load_templates
from schemas import Chunk, DeadLetter, InferenceJob, Request, Response, decode, encode
from tests.unit.conftest import FakeEmbedder, FakeVectorStore
from topics import INFERENCE, RESPONSES, RETRIEVAL

KAFKA = "kafka keeps a durable ordered log of records"
POISON = "this question breaks the embedder"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyEmbedder(FakeEmbedder):
    """Fails any call whose texts hold ``POISON``; ``down`` fails every call."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        if self.down or any(POISON in t for t in texts):
            raise EmbedderError("model failed")
        return [self.vector(t) for t in texts]


class FlakyStore(FakeVectorStore):
    """Searches for a tenant in ``broken_tenants`` fail; ``down`` fails every search."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.broken_tenants: set[str] = set()

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]:
        if self.down or self.broken_tenants & set(tenants):
            raise StoreError("search failed: connection reset")
        return super().search(vector, tenants, top_k, min_score)


@pytest.fixture
def flaky_embedder() -> FlakyEmbedder:
    return FlakyEmbedder()


@pytest.fixture
def flaky_store(flaky_embedder: FlakyEmbedder) -> FlakyStore:
    store = FlakyStore()
    store.ensure_collection(flaky_embedder.dim)
    vector = flaky_embedder.vector(KAFKA)
    store.upsert([StoredChunk("p0", PUBLIC_TENANT, "guide", KAFKA, "g.md", vector, 1)])
    return store


def _retriever(embedder: Any, store: Any, **kw: Any) -> Retriever:
    return Retriever(
        embedder, store, top_k=2, min_score=-1.0, templates=load_templates(PROMPTS_DIR), **kw
    )


def _runner(
    retriever: Retriever, requests: list[Request], clock: Clock | None = None
) -> tuple[BatchRunner, FakeConsumer, FakeProducer]:
    consumer, producer = FakeConsumer(RETRIEVAL.name), FakeProducer()
    for i, r in enumerate(requests):
        consumer.append(i % 2, encode(r), key=r.request_id)
    handler = isolated(
        "retrieval", Request, retriever.process_each, retry_budget_s=10, clock=clock or Clock()
    )
    runner = BatchRunner(consumer, producer, RETRIEVAL, handler, max_batch=64)
    consumer.assign({0, 1})
    return runner, consumer, producer


def _by_key(producer: FakeProducer, topic: str) -> dict[str, bytes]:
    return {str(r.key): r.value or b"" for r in producer.on(topic)}


def _requests(make_request: Callable[..., Request], n: int, **kw: Any) -> list[Request]:
    return [
        make_request(request_id=f"r{i}", prompt=f"question {i} about kafka", **kw) for i in range(n)
    ]


def _assert_answered_alone(producer: FakeProducer, bad: str, good: list[str], code: str) -> None:
    jobs = _by_key(producer, INFERENCE.name)
    assert sorted(jobs) == sorted(good)
    assert all(isinstance(decode(v, InferenceJob), InferenceJob) for v in jobs.values())
    letters = {k: decode(v, DeadLetter) for k, v in _by_key(producer, RETRIEVAL.dlq.name).items()}
    assert list(letters) == [bad]
    answers = {k: decode(v, Response) for k, v in _by_key(producer, RESPONSES.name).items()}
    assert list(answers) == [bad]
    assert answers[bad].error_code == code


# --- processors.batching ----------------------------------------------------------------


def test_isolate_splits_a_failing_call_down_to_the_item_that_fails() -> None:
    calls: list[list[int]] = []

    def call(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if 5 in items:
            raise EmbedderError("no")
        return [i * 10 for i in items]

    out = isolate(list(range(8)), call)
    assert out[:5] == [0, 10, 20, 30, 40] and out[6:] == [60, 70]
    assert isinstance(out[5], Failed) and not out[5].retry  # its own fault: dead-letter it
    assert len(calls) < 2 * 8  # halves, not one call per item


def test_isolate_a_dependency_that_fails_everything_is_down() -> None:
    calls: list[list[int]] = []

    def call(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        raise StoreError("down")

    out = isolate(list(range(64)), call)
    assert len(out) == DOWN_AFTER  # stopped early: the others are not tried
    assert all(isinstance(r, Failed) and r.retry for r in out)
    assert len(calls) <= 10
    (single,) = isolate([1], call)
    assert isinstance(single, Failed) and single.retry  # alone, it cannot be told apart


def test_each_isolated_failure_is_the_items_own_and_a_run_of_them_is_an_outage() -> None:
    def search(i: int) -> int:
        if i in {2, 6, 7}:
            raise StoreError("no")
        return i

    out = each(list(range(10)), search)
    assert out[:2] == [0, 1] and out[3:6] == [3, 4, 5]
    assert isinstance(out[2], Failed) and not out[2].retry
    assert len(out) == 8  # 6 and 7 in a row: down, 8 and 9 left for later
    assert all(isinstance(r, Failed) and r.retry for r in out[6:])


# --- the query path, one bad request among good ones ---------------------------------------


def test_unknown_template_version_fails_only_its_request(
    embedder: Any, store: Any, make_request: Callable[..., Request]
) -> None:
    store.ensure_collection(embedder.dim)
    good = _requests(make_request, 5, template="rag@v2/a")
    bad = make_request(request_id="bad", prompt="question", template="rag@v99/a")
    runner, consumer, producer = _runner(_retriever(embedder, store), [*good[:2], bad, *good[2:]])
    assert runner.step() == 6
    _assert_answered_alone(producer, "bad", [r.request_id for r in good], "internal_error")
    assert (
        "unknown version v99"
        in decode(_by_key(producer, RETRIEVAL.dlq.name)["bad"], DeadLetter).reason
    )
    assert consumer.committed == {(RETRIEVAL.name, 0): 3, (RETRIEVAL.name, 1): 3}


def test_a_search_that_fails_fails_only_its_request(
    flaky_embedder: FlakyEmbedder, flaky_store: FlakyStore, make_request: Callable[..., Request]
) -> None:
    flaky_store.broken_tenants = {"broken"}
    good = _requests(make_request, 6)
    bad = make_request(request_id="bad", tenant="broken", prompt="question")
    runner, consumer, producer = _runner(
        _retriever(flaky_embedder, flaky_store), [*good[:3], bad, *good[3:]]
    )
    assert runner.step() == 7
    _assert_answered_alone(producer, "bad", [r.request_id for r in good], "internal_error")
    assert consumer.committed == {(RETRIEVAL.name, 0): 4, (RETRIEVAL.name, 1): 3}


def test_an_embedder_error_on_one_question_is_split_out_of_the_batch(
    flaky_embedder: FlakyEmbedder, flaky_store: FlakyStore, make_request: Callable[..., Request]
) -> None:
    good = _requests(make_request, 9)
    bad = make_request(request_id="bad", prompt=POISON)
    runner, _consumer, producer = _runner(
        _retriever(flaky_embedder, flaky_store), [*good[:4], bad, *good[4:]]
    )
    assert runner.step() == 10
    _assert_answered_alone(producer, "bad", [r.request_id for r in good], "internal_error")
    assert len(flaky_embedder.calls) < 10  # split in halves, not one call per question


def test_a_job_over_the_record_limit_fails_only_its_request(
    embedder: Any, store: Any, make_request: Callable[..., Request]
) -> None:
    store.ensure_collection(embedder.dim)
    store.upsert([StoredChunk("p0", PUBLIC_TENANT, "g", KAFKA, "g.md", embedder.vector(KAFKA), 1)])
    good = _requests(make_request, 3)
    bad = make_request(request_id="bad", prompt="kafka " * 200_000)  # 1.2 MB of question
    runner, _consumer, producer = _runner(_retriever(embedder, store), [bad, *good])
    assert runner.step() == 4
    _assert_answered_alone(producer, "bad", [r.request_id for r in good], "invalid_request")


def test_the_context_in_a_job_is_capped(
    embedder: Any, store: Any, make_request: Callable[..., Request]
) -> None:
    # A chunk from before chunks were capped in characters: 2 MB with no space.
    store.ensure_collection(embedder.dim)
    huge = "a" * 2_000_000
    store.upsert([StoredChunk("p0", PUBLIC_TENANT, "g", huge, "g.md", embedder.vector(huge), 1)])
    (result,) = _retriever(embedder, store, max_context_chars=3000).process_each(
        [make_request(prompt="a question")]
    )
    assert isinstance(result, list)
    (emit,) = result
    job = emit.message
    assert isinstance(job, InferenceJob)
    assert sum(len(c.text) for c in job.context.chunks) == 3000
    assert len(encode(job)) < 10_000


# --- an outage is not a poison record --------------------------------------------------


def test_an_embedder_that_is_down_dead_letters_nothing_and_is_read_again(
    flaky_embedder: FlakyEmbedder, flaky_store: FlakyStore, make_request: Callable[..., Request]
) -> None:
    flaky_embedder.down = True
    requests = _requests(make_request, 8)
    runner, consumer, producer = _runner(_retriever(flaky_embedder, flaky_store), requests)
    assert runner.step() == 0
    assert producer.records == [] and consumer.committed == {}
    assert consumer.positions == {0: 0, 1: 0}  # rewound: read again
    assert runner.step() == 0  # backing off: nothing read
    flaky_embedder.down = False
    runner._resume_at = 0.0  # the backoff has passed
    assert runner.step() == 8
    assert sorted(_by_key(producer, INFERENCE.name)) == sorted(r.request_id for r in requests)
    assert producer.on(RETRIEVAL.dlq.name) == []
    assert consumer.committed == {(RETRIEVAL.name, 0): 4, (RETRIEVAL.name, 1): 4}


def test_a_store_outage_past_the_retry_budget_answers_unavailable(
    flaky_embedder: FlakyEmbedder, flaky_store: FlakyStore, make_request: Callable[..., Request]
) -> None:
    flaky_store.down = True
    clock = Clock()
    requests = _requests(make_request, 4)
    runner, consumer, producer = _runner(
        _retriever(flaky_embedder, flaky_store), requests, clock=clock
    )
    assert runner.step() == 0
    assert producer.records == []
    clock.now += 11  # past the 10 s budget, still down
    runner._resume_at = 0.0
    while runner.step():
        runner._resume_at = 0.0
    answers = {k: decode(v, Response) for k, v in _by_key(producer, RESPONSES.name).items()}
    assert sorted(answers) == sorted(r.request_id for r in requests)
    assert {a.error_code for a in answers.values()} == {"unavailable"}
    assert all(a.retry_after_s for a in answers.values())
    assert len(producer.on(RETRIEVAL.dlq.name)) == 4
    assert consumer.committed == {(RETRIEVAL.name, 0): 2, (RETRIEVAL.name, 1): 2}


def test_a_processor_that_raises_is_split_to_the_record_it_raises_on(
    make_request: Callable[..., Request],
) -> None:
    def process_each(requests: list[Request]) -> list[Any]:
        if any(r.request_id == "bad" for r in requests):
            raise PipelineError("cannot handle this one")
        return [[] for _ in requests]

    records = [*_requests(make_request, 3), make_request(request_id="bad", prompt="q")]
    consumer, producer = FakeConsumer(RETRIEVAL.name), FakeProducer()
    for r in records:
        consumer.append(0, encode(r), key=r.request_id)
    runner = BatchRunner(
        consumer, producer, RETRIEVAL, isolated("retrieval", Request, process_each)
    )
    consumer.assign({0})
    assert runner.step() == 4
    assert list(_by_key(producer, RETRIEVAL.dlq.name)) == ["bad"]
    assert consumer.committed == {(RETRIEVAL.name, 0): 4}
