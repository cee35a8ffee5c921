from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from processors.conversation import build_messages
from processors.retrieval import PUBLIC_TENANT, SYSTEM_PROMPT, Retriever, StoredChunk
from schemas import InferenceJob, Request
from topics import INFERENCE, declared, inference_topic

MakeRequest = Callable[..., Request]

# --- Retriever -----------------------------------------------------------------------------

SECRET_A = "acme secret merger plan with globex"
SECRET_B = "initech secret merger plan with globex"
PUBLIC = "kafka keeps a durable ordered log of records"


def _put(store: Any, embedder: Any, tenant: str, doc_id: str, source: str, text: str) -> None:
    """Store one chunk directly (the retriever is tested apart from the indexer)."""
    point_id = f"{tenant}:{doc_id}:0"
    store.upsert(
        [StoredChunk(point_id, tenant, doc_id, text, source, embedder.vector(text), version=1)]
    )


@pytest.fixture
def corpus(embedder: Any, store: Any) -> Any:
    store.ensure_collection(embedder.dim)
    _put(store, embedder, "a", "plan", "a.md", SECRET_A)
    _put(store, embedder, "b", "plan", "b.md", SECRET_B)
    _put(store, embedder, PUBLIC_TENANT, "guide", "g.md", PUBLIC)
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
    assert job.messages == build_messages(req, job.context.chunks, SYSTEM_PROMPT)
    assert f"[1] {SECRET_A}" in job.messages[1].content


def test_retriever_min_score_can_leave_no_context(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=3, min_score=1.01)
    req = make_request(tenant="a", prompt=SECRET_A)
    job = _job(retriever.process(req), req)
    assert job.context.chunks == []
    assert job.messages[1].content == SECRET_A
    assert corpus.searches[-1] == (["a", PUBLIC_TENANT], 3, 1.01)


def test_top_k_0_searches_nothing_a_baseline_without_retrieval(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=0, min_score=-1.0)
    searched = len(corpus.searches)
    req = make_request(tenant="a", prompt=SECRET_A)
    job = _job(retriever.process(req), req)
    assert job.context.chunks == [] and len(corpus.searches) == searched


# --- Retriever.process_batch ---------------------------------------------------------------


def test_process_batch_embeds_once_and_answers_in_order(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=10, min_score=-1.0)
    requests = [
        make_request(request_id="r-a", tenant="a", prompt=SECRET_B),
        make_request(request_id="r-c", tenant="c", prompt=PUBLIC),
        make_request(request_id="r-b", tenant="b", prompt=SECRET_A),
    ]
    out = retriever.process_batch(requests)
    # One embedding call for the whole batch, prompts in request order.
    assert embedder.calls == [[r.prompt for r in requests]]
    assert [e.key for e in out] == ["r-a", "r-c", "r-b"]
    assert all(e.topic is INFERENCE for e in out)
    jobs = [e.message for e in out]
    assert all(isinstance(j, InferenceJob) for j in jobs)
    assert [j.request for j in jobs] == requests
    assert [j.context.request_id for j in jobs] == ["r-a", "r-c", "r-b"]
    # Each request is searched with its own tenant: batching mixes no contexts.
    assert corpus.searches == [
        (["a", PUBLIC_TENANT], 10, -1.0),
        (["c", PUBLIC_TENANT], 10, -1.0),
        (["b", PUBLIC_TENANT], 10, -1.0),
    ]
    assert [{corpus.tenant_of(c.chunk_id) for c in j.context.chunks} for j in jobs] == [
        {"a", PUBLIC_TENANT},
        {PUBLIC_TENANT},
        {"b", PUBLIC_TENANT},
    ]
    for job in jobs:
        assert job.messages == build_messages(job.request, job.context.chunks, SYSTEM_PROMPT)


def test_process_batch_gives_what_process_gives(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, top_k=2, min_score=0.1)
    requests = [
        make_request(request_id=f"r{i}", tenant=t, prompt=p)
        for i, (t, p) in enumerate([("a", SECRET_A), ("b", PUBLIC), ("a", "merger globex")])
    ]
    batched = [e.message for e in retriever.process_batch(requests)]
    single = [e.message for r in requests for e in retriever.process(r)]
    assert len(embedder.calls) == 1 + len(requests)
    for b, s in zip(batched, single, strict=True):
        assert isinstance(b, InferenceJob) and isinstance(s, InferenceJob)
        assert (b.request, b.context.chunks, b.messages) == (
            s.request,
            s.context.chunks,
            s.messages,
        )


def test_process_batch_routes_each_request(
    embedder: Any, corpus: Any, make_request: MakeRequest
) -> None:
    retriever = Retriever(embedder, corpus, model_pools={"big": "gpu"})
    out = retriever.process_batch(
        [make_request(request_id="x", model="big"), make_request(request_id="y", model=None)]
    )
    assert [(e.key, e.topic) for e in out] == [("x", inference_topic("gpu")), ("y", INFERENCE)]
    assert len(embedder.calls) == 1


def test_process_batch_empty_is_empty_without_embedding(embedder: Any, corpus: Any) -> None:
    retriever = Retriever(embedder, corpus)
    assert retriever.process_batch([]) == []
    assert embedder.calls == []
    assert corpus.searches == []


# --- model pools ---------------------------------------------------------------------------


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
