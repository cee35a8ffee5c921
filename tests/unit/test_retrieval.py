from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from processors.retrieval import (
    PUBLIC_TENANT,
    SYSTEM_PROMPT,
    Retriever,
    build_messages,
    chunk_id,
    chunk_text,
    index_documents,
)
from schemas import Chunk, InferenceJob, Request
from topics import INFERENCE, declared, inference_topic

MakeRequest = Callable[..., Request]

# --- chunk_text ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\n \t \n\n\n\n"])
def test_chunk_text_empty(text: str) -> None:
    assert chunk_text(text) == []


def test_chunk_text_short_text_is_one_piece() -> None:
    assert chunk_text("  hello world  ") == ["hello world"]


def test_chunk_text_merges_paragraphs_that_fit() -> None:
    a, b, c = "a" * 10, "b" * 10, "c" * 10
    text = f"{a}\n\n{b}\n\n\n\n{c}"
    assert chunk_text(text, max_chars=34, overlap=5) == [f"{a}\n\n{b}\n\n{c}"]
    # 10 + 2 + 10 = 22 fits in 22; adding the third does not
    assert chunk_text(text, max_chars=22, overlap=5) == [f"{a}\n\n{b}", c]
    assert chunk_text(text, max_chars=21, overlap=5) == [a, b, c]


def test_chunk_text_single_newlines_do_not_split() -> None:
    assert chunk_text("line one\nline two") == ["line one\nline two"]


def test_chunk_text_long_paragraph_windows_overlap() -> None:
    para = "".join(chr(ord("a") + i % 26) + str(i % 10) for i in range(125))  # 250 chars
    pieces = chunk_text(para, max_chars=100, overlap=20)
    assert [len(p) for p in pieces] == [100, 100, 90]
    for prev, nxt in itertools.pairwise(pieces):
        assert prev[-20:] == nxt[:20]
    assert pieces[0] + "".join(p[20:] for p in pieces[1:]) == para


def test_chunk_text_long_paragraph_just_over_limit() -> None:
    para = "x" * 60 + "y" * 41  # 101 chars
    pieces = chunk_text(para, max_chars=100, overlap=20)
    assert pieces == [para[:100], para[80:]]


def test_chunk_text_long_paragraph_flushes_pending_text() -> None:
    long = "z" * 150
    pieces = chunk_text(f"intro\n\n{long}\n\noutro", max_chars=100, overlap=10)
    assert pieces[0] == "intro"
    assert pieces[-1] == "outro"
    assert "".join([pieces[1], pieces[2][10:]]) == long


@pytest.mark.parametrize(("max_chars", "overlap"), [(100, 100), (100, 101), (10, 50)])
def test_chunk_text_overlap_must_be_smaller(max_chars: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("anything", max_chars=max_chars, overlap=overlap)


def _random_doc(rng: random.Random) -> tuple[str, list[str]]:
    paras = []
    for _ in range(rng.randint(0, 8)):
        words = [
            "".join(rng.choices("abcdefgh", k=rng.randint(1, 9))) for _ in range(rng.randint(1, 60))
        ]
        paras.append(" ".join(words))
    return "\n\n".join(paras), paras


@pytest.mark.parametrize("seed", range(40))
def test_chunk_text_limits_and_coverage(seed: int) -> None:
    rng = random.Random(seed)
    max_chars = rng.randint(20, 200)
    overlap = rng.randint(0, max_chars - 1)
    text, paras = _random_doc(rng)
    pieces = chunk_text(text, max_chars=max_chars, overlap=overlap)
    assert all(0 < len(p) <= max_chars for p in pieces)
    for para in paras:
        if len(para) <= max_chars:
            assert any(para in p for p in pieces), para
        else:
            assert para[:max_chars] in pieces
            assert any(para.endswith(p) for p in pieces if len(p) > overlap), para


# --- chunk_id ------------------------------------------------------------------------------


def test_chunk_id_is_deterministic_uuid() -> None:
    a = chunk_id("acme", "doc", 0)
    assert a == chunk_id("acme", "doc", 0)
    assert uuid.UUID(a).version == 5
    # Pinned: a change here re-ids every stored point (duplicates after re-indexing).
    assert a == "6a733d55-6c21-52c2-8890-605097fd3335"


def test_chunk_id_differs_by_tenant_doc_and_index() -> None:
    ids = {chunk_id(t, d, i) for t in ("acme", "public") for d in ("doc", "doc2") for i in range(3)}
    assert len(ids) == 12


# --- index_documents -----------------------------------------------------------------------

DOCS = [
    ("kafka", "kafka.md", "Kafka is a distributed log.\n\nTopics have partitions."),
    ("moderation", "mod.md", "Moderation scores every answer before the caller sees it."),
]


def test_index_documents_writes_chunks(embedder: Any, store: Any) -> None:
    store.ensure_collection(embedder.dim)
    n = index_documents(DOCS, embedder, store)
    expected = [(d, s, piece, i) for d, s, t in DOCS for i, piece in enumerate(chunk_text(t))]
    assert n == len(expected) == len(store.points)
    for doc_id, source, piece, i in expected:
        point = store.points[chunk_id(PUBLIC_TENANT, doc_id, i)]
        assert (point.tenant, point.doc_id, point.source, point.text) == (
            PUBLIC_TENANT,
            doc_id,
            source,
            piece,
        )
        assert point.vector == embedder.vector(piece)


def test_index_documents_batches(embedder: Any, store: Any) -> None:
    docs = [(f"d{i}", "s", f"text number {i}") for i in range(5)]
    assert index_documents(docs, embedder, store, tenant="acme", batch_size=2) == 5
    assert [len(c) for c in embedder.calls] == [2, 2, 1]
    assert {p.tenant for p in store.points.values()} == {"acme"}


def test_index_documents_empty(embedder: Any, store: Any) -> None:
    assert index_documents([], embedder, store) == 0
    assert index_documents([("d", "s", "\n\n")], embedder, store) == 0
    assert embedder.calls == []
    assert store.points == {}


def test_reindexing_overwrites_instead_of_duplicating(embedder: Any, store: Any) -> None:
    index_documents(DOCS, embedder, store)
    before = dict(store.points)
    index_documents(DOCS, embedder, store)
    assert store.points == before


def test_same_doc_for_two_tenants_is_two_points(embedder: Any, store: Any) -> None:
    index_documents(DOCS[:1], embedder, store, tenant="a")
    index_documents(DOCS[:1], embedder, store, tenant="b")
    tenants = sorted(p.tenant for p in store.points.values())
    assert tenants == ["a"] * (len(tenants) // 2) + ["b"] * (len(tenants) // 2)


# --- build_messages ------------------------------------------------------------------------


def _chunk(i: int, text: str) -> Chunk:
    return Chunk(chunk_id=f"c{i}", doc_id=f"d{i}", text=text, score=1.0 / i)


def test_build_messages_numbers_passages() -> None:
    turns = build_messages("What?", [_chunk(1, "first"), _chunk(2, "second")])
    assert [t.role for t in turns] == ["system", "user"]
    assert turns[0].content == SYSTEM_PROMPT
    assert turns[1].content == "Context:\n[1] first\n\n[2] second\n\nQuestion: What?"


def test_build_messages_without_context_is_the_question() -> None:
    turns = build_messages("What?", [])
    assert turns[1].content == "What?"
    assert turns[0].content == SYSTEM_PROMPT


# --- Retriever -----------------------------------------------------------------------------

SECRET_A = "acme secret merger plan with globex"
SECRET_B = "initech secret merger plan with globex"
PUBLIC = "kafka keeps a durable ordered log of records"


@pytest.fixture
def corpus(embedder: Any, store: Any) -> Any:
    store.ensure_collection(embedder.dim)
    index_documents([("plan", "a.md", SECRET_A)], embedder, store, tenant="a")
    index_documents([("plan", "b.md", SECRET_B)], embedder, store, tenant="b")
    index_documents([("guide", "g.md", PUBLIC)], embedder, store)
    embedder.calls.clear()
    return store


def _job(out: list[Any], request: Request) -> InferenceJob:
    assert len(out) == 1
    emit = out[0]
    assert emit.topic is INFERENCE
    assert emit.key == request.request_id
    assert isinstance(emit.message, InferenceJob)
    return emit.message


@pytest.mark.parametrize(("tenant", "visible"), [("a", {"a", "public"}), ("b", {"b", "public"})])
def test_tenant_isolation(
    embedder: Any, corpus: Any, make_request: MakeRequest, tenant: str, visible: set[str]
) -> None:
    retriever = Retriever(embedder, corpus, top_k=10, min_score=-1.0)
    # Ask, as this tenant, exactly the other tenant's secret: it still must not come back.
    other_secret = SECRET_B if tenant == "a" else SECRET_A
    req = make_request(tenant=tenant, prompt=other_secret)
    job = _job(retriever.process(req), req)
    seen = {corpus.tenant_of(c.chunk_id) for c in job.context.chunks}
    assert seen == visible
    assert corpus.searches[-1] == ([tenant, PUBLIC_TENANT], 10, -1.0)


def test_unknown_tenant_sees_only_public(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=10, min_score=-1.0)
    req = make_request(tenant="c", prompt=SECRET_A)
    chunks = _job(retriever.process(req), req).context.chunks
    assert [c.text for c in chunks] == [PUBLIC]
    assert all(c.doc_id == "guide" for c in chunks)


def test_retriever_builds_the_job(embedder: Any, corpus: Any, make_request: MakeRequest) -> None:
    retriever = Retriever(embedder, corpus, top_k=2, min_score=-1.0)
    req = make_request(tenant="a", prompt=SECRET_A, request_id="rid-7")
    job = _job(retriever.process(req), req)
    assert embedder.calls == [[SECRET_A]]
    assert job.request == req
    assert job.context.request_id == "rid-7"
    assert len(job.context.chunks) == 2
    best = job.context.chunks[0]
    assert best.text == SECRET_A and best.doc_id == "plan" and best.source == "a.md"
    assert best.score == pytest.approx(1.0)
    assert job.context.chunks[0].score >= job.context.chunks[1].score
    assert job.context.embed_ms >= 0 and job.context.search_ms >= 0
    assert job.messages == build_messages(SECRET_A, job.context.chunks)
    assert f"[1] {SECRET_A}" in job.messages[1].content


def test_retriever_min_score_can_leave_no_context(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=3, min_score=1.01)
    req = make_request(tenant="a", prompt=SECRET_A)
    job = _job(retriever.process(req), req)
    assert job.context.chunks == []
    assert job.messages[1].content == SECRET_A


def test_jobs_are_routed_to_the_pool_of_their_model(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, model_pools={"big": "gpu", "big-alias": "gpu"})
    for model, topic in [
        ("big", inference_topic("gpu")),
        ("big-alias", inference_topic("gpu")),
        ("other", INFERENCE),
        (None, INFERENCE),
    ]:
        (emit,) = retriever.process(make_request(model=model))
        assert emit.topic == topic, model
    assert inference_topic("gpu").name == f"{INFERENCE.name}.gpu"


def test_pool_topics_are_declared_with_their_dlq() -> None:
    names = {t.name for t in declared(["gpu", "gpu", ""])}
    assert {inference_topic("gpu").name, inference_topic("gpu").dlq.name} <= names
    assert len(declared(["gpu"])) == len(declared()) + 2
    with pytest.raises(ValueError, match="pool name"):
        inference_topic("Bad Name!")
