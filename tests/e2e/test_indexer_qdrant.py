"""The indexer against real Qdrant and the real embedding model (no broker): what an
update and a delete leave in the store, counted in Qdrant itself. Both stores run:
Qdrant Edge (the embedded default) and qdrant-client (the server path, in its local mode)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder
from kllm.adapters.retrieval.qdrant import QdrantStore, open_client
from kllm.adapters.retrieval.qdrant_edge import EdgeStore
from kllm.core.errors import StoreError
from processors.indexing import Indexer
from schemas import Document


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


Store = QdrantStore | EdgeStore


@pytest.fixture(params=["edge", "client"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> Iterator[Store]:
    s: Store = (
        EdgeStore(tmp_path / "edge", "test")
        if request.param == "edge"
        else QdrantStore(open_client(None, tmp_path / "qdrant"), "test")
    )
    s.ensure_collection(embedder.dim)
    yield s
    s.close()


def test_update_replaces_and_delete_removes_chunks_in_qdrant(
    store: Store, embedder: SentenceTransformerEmbedder
) -> None:
    indexer = Indexer(embedder, store, embedder.count_tokens, max_tokens=64, overlap_tokens=16)
    long_text = " ".join(
        f"Section {i} explains how gate {i} is opened with badge {i}." for i in range(40)
    )
    other = Document(tenant="t1", doc_id="other", version=1, text="Unrelated notes about lunch.")
    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=1, text=long_text), other])
    first = store.count("t1", "doc")
    assert first > 3
    assert store.doc_version("t1", "doc") == 1

    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=1, text=long_text)])
    assert store.count("t1", "doc") == first  # redelivery: idempotent

    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=2, text="Now one line.")])
    assert store.count("t1", "doc") == 1 and store.doc_version("t1", "doc") == 2

    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=1, text=long_text)])
    assert store.count("t1", "doc") == 1 and store.doc_version("t1", "doc") == 2  # stale: skipped

    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=3, op="delete")])
    assert store.count("t1", "doc") == 0
    assert store.count("t1", "other") == 1  # the other document is untouched

    indexer.process_batch([Document(tenant="t1", doc_id="doc", version=2, text=long_text)])
    assert store.count("t1", "doc") == 0  # a replayed older upsert cannot resurrect it


def test_chunks_fit_the_models_window(embedder: SentenceTransformerEmbedder, store: Store) -> None:
    indexer = Indexer(embedder, store, embedder.count_tokens)  # defaults: 200 tokens, 40 overlap
    text = "Kafka partitions order records by key. " * 300
    (receipt,) = indexer.process_batch([Document(tenant="t2", doc_id="long", version=1, text=text)])
    assert receipt.message.chunks == store.count("t2", "long") > 1  # type: ignore[attr-defined]
    # all-MiniLM-L6-v2 reads 256 word pieces at most; every chunk must fit whole.
    hits = store.search(embedder.embed(["Kafka partitions"])[0], ["t2"], 100, -1.0)
    assert hits and all(embedder.count_tokens(h.text) <= 200 for h in hits)


def test_tenants_are_filtered_in_the_store(
    embedder: SentenceTransformerEmbedder, store: Store
) -> None:
    indexer = Indexer(embedder, store, embedder.count_tokens)
    indexer.process_batch(
        [
            Document(tenant="a", doc_id="d", version=1, text="The vault code is kept by Alice."),
            Document(tenant="b", doc_id="d", version=1, text="The vault code is kept by Bob."),
        ]
    )
    (vector,) = embedder.embed(["Who keeps the vault code?"])
    hits = store.search(vector, ["a"], 10, -1.0)
    assert [h.text for h in hits] == ["The vault code is kept by Alice."]
    assert {h.text for h in store.search(vector, ["a", "b"], 10, -1.0)} == {
        "The vault code is kept by Alice.",
        "The vault code is kept by Bob.",
    }


def test_embedded_store_reopens_with_its_data_and_is_owned_by_one_opener(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    first = EdgeStore(tmp_path, "test")
    first.ensure_collection(embedder.dim)
    Indexer(embedder, first, embedder.count_tokens).process_batch(
        [Document(tenant="t", doc_id="d", version=4, text="Persisted across restarts.")]
    )
    first.delete_doc("t", "gone", deleted_version=7)
    second = EdgeStore(tmp_path, "test")
    with pytest.raises(StoreError, match="one process at a time"):
        second.ensure_collection(embedder.dim)
    first.close()
    second.ensure_collection(embedder.dim)
    assert second.count("t", "d") == 1
    assert second.doc_version("t", "d") == 4 and second.doc_version("t", "gone") == 7
    second.close()
