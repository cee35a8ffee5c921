"""The indexer's limits: chunks capped in characters, a time budget per poll that lets
queries through while a large document indexes, and one document's failure its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kllm.core.errors import StoreError
from kllm.runtime.batch import BatchRunner, isolated
from kllm.testing.kafka import FakeConsumer, FakeProducer
from processors.batching import Failed
from processors.indexing import SECTION_CHARS, Indexer, chunk_by_tokens, next_section, require_text
from processors.retrieval import MAX_JOB_BYTES, Retriever, StoredChunk
from schemas import DeadLetter, Document, DocumentIndexed, InferenceJob, Request, decode, encode
from tests.unit.conftest import FakeEmbedder, FakeVectorStore, count_words
from topics import DOCUMENTS, DOCUMENTS_INDEXED, INFERENCE, RETRIEVAL

TWO_MB_OF_A = "a" * 2_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowEmbedder(FakeEmbedder):
    """Each call takes ``per_call_s`` of the fake clock; texts holding "poison" fail."""

    def __init__(self, clock: Clock, per_call_s: float = 0.1) -> None:
        super().__init__()
        self.clock = clock
        self.per_call_s = per_call_s

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        from processors.retrieval import EmbedderError

        self.clock.now += self.per_call_s
        if any("poison" in t for t in texts):
            self.calls.append(list(texts))
            raise EmbedderError("model failed")
        return super().embed(texts)


class FailingStore(FakeVectorStore):
    """Upserts of a doc id in ``broken`` fail; ``down`` fails every call."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()
        self.down = False

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        if self.down or any(c.doc_id in self.broken for c in chunks):
            raise StoreError("upsert failed: payload too large")
        super().upsert(chunks)

    def doc_version(self, tenant: str, doc_id: str) -> int | None:
        if self.down:
            raise StoreError("unreachable")
        return super().doc_version(tenant, doc_id)


def _doc(doc_id: str, text: str, version: int = 1) -> Document:
    return Document(tenant="acme", doc_id=doc_id, text=text, version=version)


def _prose(sentences: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i} is a fact about item {i}." for i in range(sentences))


# --- characters as well as tokens --------------------------------------------------------


def test_an_unbroken_run_is_cut_by_characters() -> None:
    # One "word": a WordPiece tokenizer reads it as a single unknown token.
    chunks = chunk_by_tokens(TWO_MB_OF_A, count_words, 200, 40, max_chars=2000)
    assert max(len(c) for c in chunks) == 2000
    assert "".join(chunks) == TWO_MB_OF_A


def test_long_lines_with_spaces_are_cut_at_spaces_within_the_cap() -> None:
    text = " ".join(["x" * 30] * 2000)  # 62 kB, no sentence end, few "tokens" per piece
    chunks = chunk_by_tokens(text, lambda s: 1, 200, 40, max_chars=500)
    assert all(len(c) <= 500 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_a_2mb_unbroken_document_cannot_make_a_job_over_the_record_limit(
    make_request: Any,
) -> None:
    embedder, store = FakeEmbedder(), FakeVectorStore()
    store.ensure_collection(embedder.dim)
    Indexer(embedder, store, count_words).process_batch([_doc("aaa", TWO_MB_OF_A)])
    assert max(len(c.text) for c in store.points.values()) <= 2000
    retriever = Retriever(embedder, store, top_k=5, min_score=-1.0)
    (result,) = retriever.process_each([make_request(tenant="acme", prompt=TWO_MB_OF_A[:50])])
    assert isinstance(result, list)
    (emit,) = result
    assert isinstance(emit.message, InferenceJob)
    assert len(encode(emit.message)) < 30_000 < MAX_JOB_BYTES


# --- the time budget ---------------------------------------------------------------------


def test_a_large_document_is_indexed_across_calls_without_embedding_twice() -> None:
    clock = Clock()
    embedder, store = SlowEmbedder(clock), FakeVectorStore()
    store.ensure_collection(embedder.dim)
    indexer = Indexer(
        embedder, store, count_words, 8, 2, budget_s=0.25, slice_chunks=4, clock=clock
    )
    big = _doc("big", _prose(100))
    pieces = chunk_by_tokens(big.text, count_words, 8, 2)
    calls = 0
    while not (results := indexer.process_each([big])):
        calls += 1
        assert store.points == {}  # nothing written until every chunk is embedded
        assert calls < 100
    assert calls == len(pieces) // (3 * 4)  # 3 slices of 4 per call fit 0.25 s
    (receipt,) = results
    assert isinstance(receipt, list) and isinstance(receipt[0].message, DocumentIndexed)
    assert receipt[0].message.chunks == len(pieces)
    assert sorted(c.text for c in store.doc_chunks("acme", "big")) == sorted(pieces)
    assert sum(len(c) for c in embedder.calls) == len(pieces)  # each chunk embedded once


def test_the_budget_stops_between_documents_and_keeps_their_order() -> None:
    clock = Clock()
    embedder, store = SlowEmbedder(clock), FakeVectorStore()
    store.ensure_collection(embedder.dim)
    indexer = Indexer(
        embedder, store, count_words, 8, 2, budget_s=0.15, slice_chunks=2, clock=clock
    )
    docs = [_doc(f"d{i}", "One fact. Another fact here. A third.") for i in range(6)]
    done = indexer.process_each(docs)
    assert 0 < len(done) < len(docs)
    assert all(isinstance(r, list) for r in done)
    assert {c.doc_id for c in store.points.values()} == {f"d{i}" for i in range(len(done))}


def _indexer_runner(
    indexer: Indexer, docs: list[Document]
) -> tuple[BatchRunner, FakeConsumer, FakeProducer]:
    consumer, producer = FakeConsumer(DOCUMENTS.name), FakeProducer()
    for d in docs:
        consumer.append(0, encode(d), key=f"{d.tenant}/{d.doc_id}")
    handler = isolated("indexer", Document, indexer.process_each, require_text)
    runner = BatchRunner(consumer, producer, DOCUMENTS, handler, max_batch=16)
    consumer.assign({0})
    return runner, consumer, producer


def test_queries_are_answered_while_a_large_document_indexes(make_request: Any) -> None:
    clock = Clock()
    embedder, store = SlowEmbedder(clock), FakeVectorStore()
    store.ensure_collection(embedder.dim)
    indexer = Indexer(
        embedder, store, count_words, 8, 2, budget_s=0.25, slice_chunks=4, clock=clock
    )
    small = _doc("small", "A small doc. With two sentences.")
    docs, consumer, producer = _indexer_runner(indexer, [_doc("big", _prose(100)), small])
    questions, query_out = FakeConsumer(RETRIEVAL.name), FakeProducer()
    query = BatchRunner(
        questions,
        query_out,
        RETRIEVAL,
        isolated("retrieval", Request, Retriever(embedder, store, min_score=-1.0).process_each),
    )
    questions.assign({0})
    answered_while_indexing = 0
    for i in range(40):
        questions.append(0, encode(make_request(request_id=f"q{i}", prompt="item 3")))
        docs.step()
        if not producer.on(DOCUMENTS_INDEXED.name):
            assert consumer.committed.get((DOCUMENTS.name, 0), 0) == 0  # nothing past big
        assert query.step() == 1
        if not producer.on(DOCUMENTS_INDEXED.name):
            answered_while_indexing += 1
    assert answered_while_indexing >= 5  # the big document took several polls
    assert {
        decode(r.value or b"", DocumentIndexed).doc_id for r in producer.on(DOCUMENTS_INDEXED.name)
    } == {"big", "small"}
    assert consumer.committed == {(DOCUMENTS.name, 0): 2}
    assert len(query_out.on(INFERENCE.name)) == 40


# --- one document's failure is its own ---------------------------------------------------


@pytest.mark.parametrize("failure", ["embedder", "store"])
def test_one_failing_document_is_dead_lettered_and_the_others_indexed(failure: str) -> None:
    clock = Clock()
    embedder, store = SlowEmbedder(clock, 0.0), FailingStore()
    store.ensure_collection(embedder.dim)
    indexer = Indexer(embedder, store, count_words, 8, 2, budget_s=10.0, clock=clock)
    bad_text = "This one is poison. It fails." if failure == "embedder" else "Fine text."
    store.broken = {"bad"} if failure == "store" else set()
    docs = [_doc("a", "First doc."), _doc("bad", bad_text), _doc("b", "Second doc. More.")]
    runner, consumer, producer = _indexer_runner(indexer, docs)
    assert runner.step() == 3
    receipts = [
        decode(r.value or b"", DocumentIndexed) for r in producer.on(DOCUMENTS_INDEXED.name)
    ]
    assert sorted(r.doc_id for r in receipts) == ["a", "b"]
    (letter,) = [decode(r.value or b"", DeadLetter) for r in producer.on(DOCUMENTS.dlq.name)]
    assert letter.key == "acme/bad"
    assert consumer.committed == {(DOCUMENTS.name, 0): 3}


def test_a_store_that_is_down_dead_letters_no_document() -> None:
    embedder, store = FakeEmbedder(), FailingStore()
    store.ensure_collection(embedder.dim)
    store.down = True
    indexer = Indexer(embedder, store, count_words, 8, 2, budget_s=1.0)
    results = indexer.process_each([_doc(f"d{i}", "Text.") for i in range(5)])
    assert len(results) == 2 and all(isinstance(r, Failed) and r.retry for r in results)
    runner, consumer, producer = _indexer_runner(
        indexer, [_doc(f"d{i}", "Text.") for i in range(5)]
    )
    assert runner.step() == 0
    assert producer.records == [] and consumer.committed == {}
    store.down = False
    runner._resume_at = 0.0
    assert runner.step() == 5
    assert len(producer.on(DOCUMENTS_INDEXED.name)) == 5


def test_a_large_document_is_chunked_a_section_at_a_time() -> None:
    clock = Clock()
    embedder, store = SlowEmbedder(clock), FakeVectorStore()
    store.ensure_collection(embedder.dim)
    counted: list[int] = []

    def count(text: str) -> int:
        counted.append(len(text))
        return count_words(text)

    indexer = Indexer(embedder, store, count, 20, 4, budget_s=0.05, slice_chunks=4, clock=clock)
    big = _doc("big", _prose(20_000))  # 700 kB
    assert indexer.process_each([big]) == []
    assert sum(counted) < 2 * SECTION_CHARS  # one section chunked, not the document
    while not indexer.process_each([big]):
        pass
    assert sum(counted) < 2 * len(big.text)


def test_sections_end_at_a_sentence_end() -> None:
    text = _prose(5000)
    section, rest = next_section(text, 1000)
    assert section.rstrip().endswith(".") and len(section) <= 1000
    assert section + rest == text
    assert next_section("a" * 2500, 1000) == ("a" * 1000, "a" * 1500)
