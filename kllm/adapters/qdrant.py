"""Qdrant behind the retrieval VectorStore protocol: embedded (local path) or a server URL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qdrant_client import QdrantClient, models

from kllm.errors import StoreError
from processors.retrieval import StoredChunk
from schemas import Chunk

COLLECTION_SCHEMA_VERSION = 1


def open_client(url: str | None, path: Path) -> QdrantClient:
    """A server client when ``url`` is set, else embedded storage at ``path`` (one process only)."""
    try:
        if url:
            return QdrantClient(url=url)
        path.mkdir(parents=True, exist_ok=True)
        return QdrantClient(path=str(path))
    except (RuntimeError, ValueError) as exc:
        # Embedded mode locks the folder: a second process opening it lands here.
        raise StoreError(f"cannot open Qdrant ({url or path}): {exc}") from exc


class QdrantStore:
    def __init__(self, client: QdrantClient, collection: str) -> None:
        self.client = client
        # The version is part of the name: a schema change builds a new collection.
        self.collection = f"{collection}_v{COLLECTION_SCHEMA_VERSION}"

    def ensure_collection(self, dim: int) -> None:
        try:
            if not self.client.collection_exists(self.collection):
                self.client.create_collection(
                    self.collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                )
                self.client.create_payload_index(
                    self.collection, "tenant", models.PayloadSchemaType.KEYWORD
                )
        except Exception as exc:
            raise StoreError(f"cannot create collection {self.collection}: {exc}") from exc

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = [
            models.PointStruct(
                id=c.point_id,
                vector=c.vector,
                payload={
                    "tenant": c.tenant,
                    "doc_id": c.doc_id,
                    "text": c.text,
                    "source": c.source,
                },
            )
            for c in chunks
        ]
        try:
            self.client.upsert(self.collection, points=points, wait=True)
        except Exception as exc:
            raise StoreError(f"upsert into {self.collection} failed: {exc}") from exc

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]:
        only_tenants = models.Filter(
            must=[models.FieldCondition(key="tenant", match=models.MatchAny(any=list(tenants)))]
        )
        try:
            hits = self.client.query_points(
                self.collection,
                query=list(vector),
                query_filter=only_tenants,
                limit=top_k,
                score_threshold=min_score,
                with_payload=True,
            ).points
        except Exception as exc:
            raise StoreError(f"search in {self.collection} failed: {exc}") from exc
        return [
            Chunk(
                chunk_id=str(h.id),
                doc_id=str((h.payload or {}).get("doc_id", "")),
                text=str((h.payload or {}).get("text", "")),
                source=str((h.payload or {}).get("source", "")),
                score=float(h.score),
            )
            for h in hits
        ]

    def close(self) -> None:
        self.client.close()
