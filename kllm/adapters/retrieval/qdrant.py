"""Qdrant behind the retrieval VectorStore protocol.

``QdrantStore`` speaks to a Qdrant server through qdrant-client (its local mode
also works, for tests); ``open_store`` picks it for a URL and Qdrant Edge, the
embedded engine, for a local path.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qdrant_client import QdrantClient, models

from kllm.core.errors import StoreError
from processors.retrieval import StoredChunk
from schemas import Chunk

if TYPE_CHECKING:
    from kllm.adapters.retrieval.qdrant_edge import EdgeStore

COLLECTION_SCHEMA_VERSION = 1
BUSY_HINT = (
    " (embedded Qdrant is open in one process at a time: stop the retrieval stage, "
    "or point KLLM_QDRANT_URL at a Qdrant server)"
)
_TOMBSTONES = uuid.UUID("0b5e3a52-7c1d-4f0e-8a4b-6c2d9e1f3a70")


def tombstone_id(tenant: str, doc_id: str) -> str:
    """One stable point id per (tenant, document) for its deletion record."""
    return str(uuid.uuid5(_TOMBSTONES, f"{len(tenant)}:{tenant}/{doc_id}"))


def open_store(url: str | None, path: Path, collection: str) -> QdrantStore | EdgeStore:
    """The Qdrant server at ``url`` when set, else embedded Qdrant (Qdrant Edge) under
    ``path``, owned by this process. Call ``ensure_collection`` before use."""
    if url:
        return QdrantStore(open_client(url, path), collection)
    from kllm.adapters.retrieval.qdrant_edge import EdgeStore

    return EdgeStore(path / "edge", collection)


def open_client(url: str | None, path: Path) -> QdrantClient:
    """A server client when ``url`` is set, else embedded storage at ``path`` (one process only)."""
    try:
        if url:
            return QdrantClient(url=url)
        path.mkdir(parents=True, exist_ok=True)
        return QdrantClient(path=str(path))
    except (RuntimeError, ValueError) as exc:
        # Embedded mode locks the folder: a second process opening it lands here.
        hint = "" if url else BUSY_HINT
        raise StoreError(f"cannot open Qdrant ({url or path}): {exc}{hint}") from exc


class QdrantStore:
    def __init__(self, client: QdrantClient, collection: str) -> None:
        self.client = client
        # The version is part of the name: a schema change builds a new collection.
        self.collection = f"{collection}_v{COLLECTION_SCHEMA_VERSION}"
        self.tombstones = f"{self.collection}_deleted"

    def ensure_collection(self, dim: int) -> None:
        try:
            if not self.client.collection_exists(self.collection):
                self.client.create_collection(
                    self.collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                )
                for field in ("tenant", "doc_id"):
                    self.client.create_payload_index(
                        self.collection, field, models.PayloadSchemaType.KEYWORD
                    )
            if not self.client.collection_exists(self.tombstones):
                self.client.create_collection(
                    self.tombstones,
                    vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
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
                    "version": c.version,
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

    @staticmethod
    def _doc_filter(tenant: str, doc_id: str) -> models.Filter:
        return models.Filter(
            must=[
                models.FieldCondition(key="tenant", match=models.MatchValue(value=tenant)),
                models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc_id)),
            ]
        )

    def delete_doc(self, tenant: str, doc_id: str, deleted_version: int | None = None) -> None:
        selector = models.FilterSelector(filter=self._doc_filter(tenant, doc_id))
        try:
            self.client.delete(self.collection, points_selector=selector, wait=True)
            if deleted_version is not None:
                # Tombstones live in a one-dimensional side collection, never searched.
                tomb = models.PointStruct(
                    id=tombstone_id(tenant, doc_id),
                    vector=[1.0],
                    payload={"tenant": tenant, "doc_id": doc_id, "version": deleted_version},
                )
                self.client.upsert(self.tombstones, points=[tomb], wait=True)
        except Exception as exc:
            raise StoreError(f"delete of {tenant}/{doc_id} failed: {exc}") from exc

    def doc_version(self, tenant: str, doc_id: str) -> int | None:
        try:
            points, _next = self.client.scroll(
                self.collection,
                scroll_filter=self._doc_filter(tenant, doc_id),
                limit=1,
                with_payload=["version"],
            )
            tombs = self.client.retrieve(
                self.tombstones, [tombstone_id(tenant, doc_id)], with_payload=["version"]
            )
        except Exception as exc:
            raise StoreError(f"reading {tenant}/{doc_id} failed: {exc}") from exc
        versions = [int((p.payload or {}).get("version", 0)) for p in [*points, *tombs]]
        return max(versions) if versions else None

    def count(self, tenant: str | None = None, doc_id: str | None = None) -> int:
        """Points stored, optionally for one tenant and/or document (for checks and tests)."""
        must = [
            models.FieldCondition(key=k, match=models.MatchValue(value=v))
            for k, v in (("tenant", tenant), ("doc_id", doc_id))
            if v is not None
        ]
        flt = models.Filter(must=must) if must else None  # type: ignore[arg-type]
        return int(self.client.count(self.collection, count_filter=flt, exact=True).count)

    def close(self) -> None:
        self.client.close()
