"""The retrieval stage's batch handlers, seeding and wiring, over the in-memory fakes."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from kllm.adapters.retrieval.documents import seed_documents as seed_documents_of
from kllm.runtime.batch import BatchHandler, isolated
from kllm.runtime.dispatch import RecordRef
from processors.base import Emit
from processors.embeddings import unpacked
from processors.indexing import Indexer, chunk_by_tokens, require_text
from processors.retrieval import PUBLIC_TENANT, Retriever, StoredChunk
from schemas import (
    DeadLetter,
    Document,
    DocumentIndexed,
    EmbeddingRequest,
    Embeddings,
    InferenceJob,
    Request,
    Response,
    encode,
)
from services.retrieval import CACHE, EMBEDDER, INDEXER, STAGE, Settings, build
from tests.unit.conftest import count_words
from topics import (
    CACHE_GROUP,
    DOCUMENTS,
    DOCUMENTS_INDEXED,
    EMBEDDING_GROUP,
    EMBEDDING_REQUESTS,
    EMBEDDINGS,
    INDEXER_GROUP,
    INFERENCE,
    RESPONSES,
    RETRIEVAL,
    RETRIEVAL_GROUP,
)

MakeRequest = Callable[..., Request]

KAFKA = "kafka keeps a durable ordered log of records"


def _ref(topic: Any, offset: int, key: str | None = None) -> RecordRef:
    return RecordRef(topic, 1, offset, key)


Records = Sequence[tuple[RecordRef, bytes]]


def outputs_of(handler: BatchHandler) -> Callable[[Records], list[Emit]]:
    """``handler``'s outputs, for a batch it handles whole (nothing given back)."""

    def run(records: Records) -> list[Emit]:
        handled = handler(records)
        if isinstance(handled, list):
            return handled
        assert handled.again == {} and handled.retry_in_s == 0
        return handled.outputs

    return run


# The handlers as build() makes them (test_build_wires_the_handlers checks it does).
def query_handler(retriever: Retriever) -> Callable[[Records], list[Emit]]:
    return outputs_of(isolated(STAGE, Request, retriever.process_each))


def document_handler(indexer: Indexer) -> Callable[[Records], list[Emit]]:
    return outputs_of(isolated(INDEXER, Document, indexer.process_each, require_text))


def seed_documents(seed_dir: Path) -> list[Document]:
    return seed_documents_of(seed_dir, PUBLIC_TENANT)


@pytest.fixture
def retriever(embedder: Any, store: Any) -> Retriever:
    store.ensure_collection(embedder.dim)
    store.upsert(
        [StoredChunk("p0", PUBLIC_TENANT, "guide", KAFKA, "g.md", embedder.vector(KAFKA), 1)]
    )
    return Retriever(embedder, store, top_k=2, min_score=-1.0)


@pytest.fixture
def indexer(embedder: Any, store: Any) -> Indexer:
    store.ensure_collection(embedder.dim)
    return Indexer(embedder, store, count_words, max_tokens=8, overlap_tokens=2)


def _letter(emit: Any, topic: Any) -> DeadLetter:
    assert emit.topic == topic.dlq
    assert isinstance(emit.message, DeadLetter)
    return emit.message


# --- query_handler -------------------------------------------------------------------------


def test_query_handler_turns_requests_into_jobs(
    retriever: Retriever, embedder: Any, make_request: MakeRequest
) -> None:
    reqs = [make_request(request_id=f"r{i}", prompt=f"question {i} about kafka") for i in range(3)]
    out = query_handler(retriever)(
        [(_ref(RETRIEVAL, i, r.request_id), encode(r)) for i, r in enumerate(reqs)]
    )
    assert [(e.topic, e.key) for e in out] == [(INFERENCE, r.request_id) for r in reqs]
    jobs = [e.message for e in out]
    assert all(isinstance(j, InferenceJob) for j in jobs)
    assert [j.request for j in jobs] == reqs
    assert all(j.context.chunks[0].text == KAFKA for j in jobs)
    assert embedder.calls == [[r.prompt for r in reqs]]  # one embedding call for the batch


def test_query_handler_dead_letters_garbage_and_keeps_the_rest(
    retriever: Retriever, embedder: Any, make_request: MakeRequest
) -> None:
    good1, good2 = make_request(request_id="g1"), make_request(request_id="g2")
    garbage = b"\x00not a message"
    records = [
        (_ref(RETRIEVAL, 10, "g1"), encode(good1)),
        (_ref(RETRIEVAL, 11, "k-bad"), garbage),
        (_ref(RETRIEVAL, 12, "g2"), encode(good2)),
    ]
    out = query_handler(retriever)(records)
    dlq = [e for e in out if e.topic != INFERENCE]
    jobs = [e for e in out if e.topic == INFERENCE]
    assert [e.key for e in jobs] == ["g1", "g2"]
    (emit,) = dlq  # no request id in garbage: no error response, only the DLQ record
    letter = _letter(emit, RETRIEVAL)
    assert emit.topic.name == f"{RETRIEVAL.name}.dlq"
    assert emit.key == "k-bad"
    assert (letter.stage, letter.source_topic, letter.partition, letter.offset, letter.key) == (
        "retrieval",
        RETRIEVAL.name,
        1,
        11,
        "k-bad",
    )
    assert letter.reason.startswith("SchemaError: payload is not valid JSON")
    assert base64.b64decode(letter.payload_b64) == garbage
    assert embedder.calls == [[good1.prompt, good2.prompt]]


def test_query_handler_invalid_request_with_an_id_also_answers_the_caller(
    retriever: Retriever, embedder: Any, make_request: MakeRequest
) -> None:
    body = orjson.loads(encode(make_request(request_id="r-bad", tenant="acme")))
    data = orjson.dumps({**body, "prompt": ""})
    out = query_handler(retriever)([(_ref(RETRIEVAL, 3), data)])
    assert [e.topic for e in out] == [RETRIEVAL.dlq, RESPONSES]
    assert _letter(out[0], RETRIEVAL).request_id == "r-bad"
    response = out[1].message
    assert isinstance(response, Response)
    assert (response.request_id, response.tenant, response.finish_reason) == (
        "r-bad",
        "acme",
        "error",
    )
    assert "prompt" in (response.error or "")
    assert embedder.calls == []  # nothing valid: no embedding call at all


def test_query_handler_rejects_another_schema(retriever: Retriever) -> None:
    doc = Document(tenant="acme", doc_id="d", text="x")
    (emit,) = query_handler(retriever)([(_ref(RETRIEVAL, 0), encode(doc))])
    assert "expected schema 'llm.request'" in _letter(emit, RETRIEVAL).reason


def test_query_handler_empty_batch(retriever: Retriever, embedder: Any) -> None:
    assert query_handler(retriever)([]) == []
    assert embedder.calls == []


# --- document_handler ----------------------------------------------------------------------


def test_document_handler_indexes_and_acknowledges(indexer: Indexer, store: Any) -> None:
    doc = Document(tenant="acme", doc_id="kb/1", text="One fact. Another fact.", version=2)
    (emit,) = document_handler(indexer)([(_ref(DOCUMENTS, 0, "acme/kb/1"), encode(doc))])
    assert (emit.topic, emit.key) == (DOCUMENTS_INDEXED, "acme/kb/1")
    assert emit.message == DocumentIndexed(
        tenant="acme", doc_id="kb/1", version=2, op="upsert", chunks=1
    )
    assert [c.text for c in store.doc_chunks("acme", "kb/1")] == ["One fact. Another fact."]


@pytest.mark.parametrize("text", ["", "   \n\n\t"])
def test_document_handler_dead_letters_an_upsert_without_text(
    indexer: Indexer, embedder: Any, store: Any, text: str
) -> None:
    indexer.process_batch([Document(tenant="acme", doc_id="keep", text="Still here.")])
    before = dict(store.points)
    embedder.calls.clear()
    empty = encode(Document(tenant="acme", doc_id="keep", text=text, version=9))
    ok = Document(tenant="acme", doc_id="other", text="Fine text.")
    out = document_handler(indexer)(
        [(_ref(DOCUMENTS, 5, "acme/keep"), empty), (_ref(DOCUMENTS, 6, "acme/other"), encode(ok))]
    )
    assert [e.topic for e in out] == [DOCUMENTS.dlq, DOCUMENTS_INDEXED]
    letter = _letter(out[0], DOCUMENTS)
    assert out[0].topic.name == f"{DOCUMENTS.name}.dlq"
    assert "no text" in letter.reason
    assert (letter.stage, letter.offset, letter.key) == ("indexer", 5, "acme/keep")
    assert base64.b64decode(letter.payload_b64) == empty
    # The rejected upsert did not wipe the stored document; the good one went through.
    assert {k: v for k, v in store.points.items() if v.doc_id == "keep"} == before
    assert [c.text for c in store.doc_chunks("acme", "other")] == ["Fine text."]


def test_document_handler_delete_needs_no_text(indexer: Indexer, store: Any) -> None:
    indexer.process_batch([Document(tenant="acme", doc_id="d", text="Some text.")])
    delete = Document(tenant="acme", doc_id="d", op="delete")
    (emit,) = document_handler(indexer)([(_ref(DOCUMENTS, 0), encode(delete))])
    assert isinstance(emit.message, DocumentIndexed) and emit.message.op == "delete"
    assert store.points == {}


def test_document_handler_dead_letters_garbage(indexer: Indexer, embedder: Any) -> None:
    (emit,) = document_handler(indexer)([(_ref(DOCUMENTS, 7, "k"), b"[1, 2]")])
    letter = _letter(emit, DOCUMENTS)
    assert "must be a JSON object" in letter.reason
    assert emit.key == "k"


# --- seed_documents and build --------------------------------------------------------------


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def seed_dir(tmp_path: Path) -> Path:
    _write(tmp_path, "a/b.md", "Kafka keeps a durable log. Consumers read it in order.")
    _write(tmp_path, "top.txt", "Moderation scores every answer.")
    _write(tmp_path, "c/d/e.txt", "Deeply nested notes.")
    _write(tmp_path, "skip.rst", "Not a seed file.")
    _write(tmp_path, "a/skip.json", "{}")
    return tmp_path


def test_seed_documents(seed_dir: Path) -> None:
    docs = seed_documents(seed_dir)
    assert [d.doc_id for d in docs] == ["a/b", "c/d/e", "top"]
    assert {d.tenant for d in docs} == {PUBLIC_TENANT}
    assert {d.op for d in docs} == {"upsert"}
    by_id = {d.doc_id: d for d in docs}
    assert by_id["a/b"].text == "Kafka keeps a durable log. Consumers read it in order."
    assert by_id["a/b"].source == "b.md"
    assert by_id["top"].source == "top.txt"
    assert all(d.version >= 0 for d in docs)
    # The version follows the file: a rewrite with a later mtime gets a higher one.
    path = seed_dir / "top.txt"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    (again,) = [d for d in seed_documents(seed_dir) if d.doc_id == "top"]
    assert again.version > by_id["top"].version


def test_seed_documents_empty_dir(tmp_path: Path) -> None:
    assert seed_documents(tmp_path) == []


def _settings(seed_dir: Path, **kw: Any) -> Settings:
    return Settings(seed_dir=seed_dir, chunk_tokens=6, chunk_overlap_tokens=1, **kw)


def test_build_seeds_the_corpus(
    seed_dir: Path, embedder: Any, store: Any, make_request: MakeRequest
) -> None:
    handlers = build(_settings(seed_dir, top_k=1, min_score=-1.0), embedder=embedder, store=store)
    assert store.dim == embedder.dim
    for doc in seed_documents(seed_dir):
        stored = store.doc_chunks(PUBLIC_TENANT, doc.doc_id)
        assert [c.text for c in stored] == chunk_by_tokens(doc.text, count_words, 6, 1)
        assert {c.version for c in stored} == {doc.version}
    assert {c.doc_id for c in store.points.values()} == {"a/b", "c/d/e", "top"}
    assert len(embedder.calls) == 1  # the seed corpus is one batch
    # Any tenant now finds the seed corpus, top 1.
    query = outputs_of(handlers[-1][2])
    req = make_request(tenant="acme", prompt="Moderation scores every answer.")
    (emit,) = query([(_ref(RETRIEVAL, 0, req.request_id), encode(req))])
    assert isinstance(emit.message, InferenceJob)
    assert [c.doc_id for c in emit.message.context.chunks] == ["top"]


def test_build_wires_the_handlers(seed_dir: Path, embedder: Any, store: Any) -> None:
    handlers = build(_settings(seed_dir), embedder=embedder, store=store)
    assert [(g, name) for g, name, _ in handlers] == [
        (INDEXER_GROUP, INDEXER),
        (EMBEDDING_GROUP, EMBEDDER),
        (CACHE_GROUP, CACHE),
        (RETRIEVAL_GROUP, STAGE),
    ]
    index = outputs_of(handlers[0][2])
    empty = Document(tenant="acme", doc_id="x", text=" ")
    (emit,) = index([(_ref(DOCUMENTS, 0, "acme/x"), encode(empty))])
    assert "no text" in _letter(emit, DOCUMENTS).reason  # the text check is on
    fill = handlers[2][2]
    assert fill([(_ref(RESPONSES, 0, "k"), b"not json")]) == []  # a side reader: no DLQ
    without_cache = build(_settings(seed_dir, cache=False), embedder=embedder, store=store)
    assert [g for g, _, _ in without_cache] == [INDEXER_GROUP, EMBEDDING_GROUP, RETRIEVAL_GROUP]


def test_the_embedding_handler_answers_with_the_retrieval_embedder(
    seed_dir: Path, embedder: Any, store: Any
) -> None:
    handlers = build(_settings(seed_dir), embedder=embedder, store=store)
    embed = outputs_of(handlers[1][2])
    asked = EmbeddingRequest(request_id="e1", tenant="acme", inputs=["kafka logs", "qdrant"])
    (emit,) = embed([(_ref(EMBEDDING_REQUESTS, 0, "e1"), encode(asked))])
    assert emit.topic is EMBEDDINGS
    answer = emit.message
    assert isinstance(answer, Embeddings)
    got = [unpacked(v) for v in answer.vectors_b64]
    want = [embedder.vector("kafka logs"), embedder.vector("qdrant")]
    assert np.allclose(got, want, atol=1e-7)
    assert answer.prompt_tokens == 3 and answer.model == "all-minilm-l6-v2"
    other = asked.model_copy(update={"request_id": "e2", "model": "text-embedding-3-small"})
    letter, error = embed([(_ref(EMBEDDING_REQUESTS, 1, "e2"), encode(other))])
    assert "'text-embedding-3-small' is not served" in _letter(letter, EMBEDDING_REQUESTS).reason
    assert isinstance(error.message, Response) and error.message.error_code == "model_not_found"


def test_build_twice_reindexes_in_place(seed_dir: Path, embedder: Any, store: Any) -> None:
    build(_settings(seed_dir), embedder=embedder, store=store)
    before = dict(store.points)
    build(_settings(seed_dir), embedder=embedder, store=store)  # a restart
    assert store.points == before


def test_build_without_a_seed_dir(tmp_path: Path, embedder: Any, store: Any) -> None:
    handlers = build(_settings(tmp_path / "missing"), embedder=embedder, store=store)
    assert store.points == {}
    assert embedder.calls == []
    assert len(handlers) == 4
