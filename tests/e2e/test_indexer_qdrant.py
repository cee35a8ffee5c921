"""The indexer against real embedded Qdrant and the real embedding model (no broker):
what an update and a delete leave in the store, counted in Qdrant itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kllm.adapters.embedder import SentenceTransformerEmbedder
from kllm.adapters.qdrant import QdrantStore, open_client
from processors.indexing import Indexer
from schemas import Document


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture()
def store(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> Iterator[QdrantStore]:
    s = QdrantStore(open_client(None, tmp_path / "qdrant"), "test")
    s.ensure_collection(embedder.dim)
    yield s
    s.close()


def test_update_replaces_and_delete_removes_chunks_in_qdrant(
    store: QdrantStore, embedder: SentenceTransformerEmbedder
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


def test_chunks_fit_the_models_window(
    embedder: SentenceTransformerEmbedder, store: QdrantStore
) -> None:
    indexer = Indexer(embedder, store, embedder.count_tokens)  # defaults: 200 tokens, 40 overlap
    text = "Kafka partitions order records by key. " * 300
    (receipt,) = indexer.process_batch([Document(tenant="t2", doc_id="long", version=1, text=text)])
    assert receipt.message.chunks == store.count("t2", "long") > 1  # type: ignore[attr-defined]
    # all-MiniLM-L6-v2 reads 256 word pieces at most; every chunk must fit whole.
    hits = store.search(embedder.embed(["Kafka partitions"])[0], ["t2"], 100, -1.0)
    assert hits and all(embedder.count_tokens(h.text) <= 200 for h in hits)
