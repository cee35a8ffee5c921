"""Embedded Qdrant (Qdrant Edge) behind the retrieval VectorStore protocol.

Qdrant Edge runs the Qdrant engine itself in this process: payload indexes
(a tenant index here), segments and a write-ahead log, so filtered search stays
in the millisecond range at 100k chunks, where qdrant-client's local mode
checks every point's payload in Python. A Qdrant server (``KLLM_QDRANT_URL``)
goes through ``QdrantStore``; both implement the same protocol and the stage
code does not know which one it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from kllm.adapters.retrieval.qdrant import BUSY_HINT, COLLECTION_SCHEMA_VERSION, tombstone_id
from kllm.core.errors import StoreError
from processors.retrieval import StoredChunk
from schemas import Chunk


def _open_shard(path: Path, config: qe.EdgeConfig) -> tuple[qe.EdgeShard, bool]:
    """The shard at ``path`` and whether it was just created."""
    try:
        if path.is_dir() and any(path.iterdir()):
            return qe.EdgeShard.load(str(path), config), False
        path.mkdir(parents=True, exist_ok=True)
        return qe.EdgeShard.create(str(path), config), True
    except Exception as exc:
        busy = "WouldBlock" in str(exc)
        hint = BUSY_HINT if busy else ""
        raise StoreError(f"cannot open embedded Qdrant at {path}: {exc}{hint}") from exc


def _match(key: str, value: str) -> qe.FieldCondition:
    return qe.FieldCondition(key=key, match=qe.MatchValue(value))


class EdgeStore:
    """Chunks in one Edge shard per collection, tombstones in a small side shard."""

    def __init__(self, root: Path, collection: str) -> None:
        self.root = root
        self.collection = f"{collection}_v{COLLECTION_SCHEMA_VERSION}"
        self._shard: qe.EdgeShard | None = None
        self._tombs: qe.EdgeShard | None = None

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise StoreError(f"collection {self.collection} is not open (call ensure_collection)")
        return self._shard

    @property
    def tombs(self) -> qe.EdgeShard:
        if self._tombs is None:
            raise StoreError(f"collection {self.collection} is not open (call ensure_collection)")
        return self._tombs

    def ensure_collection(self, dim: int) -> None:
        vectors = qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)
        self._shard, created = _open_shard(
            self.root / self.collection, qe.EdgeConfig(vectors=vectors)
        )
        if created:
            self._apply(
                self.shard,
                qe.UpdateOperation.create_field_index(
                    "tenant", qe.KeywordIndexParams(is_tenant=True)
                ),
                qe.UpdateOperation.create_field_index("doc_id", qe.PayloadSchemaType.Keyword),
            )
        one = qe.EdgeVectorParams(size=1, distance=qe.Distance.Dot)
        self._tombs, _ = _open_shard(
            self.root / f"{self.collection}_deleted", qe.EdgeConfig(vectors=one)
        )

    def _apply(self, shard: qe.EdgeShard, *ops: qe.UpdateOperation) -> None:
        try:
            for op in ops:
                shard.update(op)
        except Exception as exc:
            raise StoreError(f"update of {self.collection} failed: {exc}") from exc

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = [
            qe.Point(
                c.point_id,
                list(c.vector),
                {
                    "tenant": c.tenant,
                    "doc_id": c.doc_id,
                    "text": c.text,
                    "source": c.source,
                    "version": c.version,
                },
            )
            for c in chunks
        ]
        self._apply(self.shard, qe.UpdateOperation.upsert_points(points))

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]:
        request = qe.QueryRequest(
            limit=top_k,
            query=qe.Query.Nearest(list(vector)),
            filter=qe.Filter(must=[qe.FieldCondition("tenant", match=qe.MatchAny(list(tenants)))]),
            score_threshold=min_score,
            with_payload=True,
        )
        try:
            hits = self.shard.query(request)
        except Exception as exc:
            raise StoreError(f"search in {self.collection} failed: {exc}") from exc
        return [_chunk(h.id, h.payload or {}, h.score) for h in hits]

    def delete_doc(self, tenant: str, doc_id: str, deleted_version: int | None = None) -> None:
        doc = qe.Filter(must=[_match("tenant", tenant), _match("doc_id", doc_id)])
        self._apply(self.shard, qe.UpdateOperation.delete_points_by_filter(doc))
        if deleted_version is not None:
            # Remembered apart from the chunks, so a replayed older upsert stays deleted.
            tomb = qe.Point(
                tombstone_id(tenant, doc_id),
                [1.0],
                {"tenant": tenant, "doc_id": doc_id, "version": deleted_version},
            )
            self._apply(self.tombs, qe.UpdateOperation.upsert_points([tomb]))

    def doc_version(self, tenant: str, doc_id: str) -> int | None:
        doc = qe.Filter(must=[_match("tenant", tenant), _match("doc_id", doc_id)])
        try:
            points, _next = self.shard.scroll(
                qe.ScrollRequest(limit=1, filter=doc, with_payload=True)
            )
            tombs = self.tombs.retrieve(
                [tombstone_id(tenant, doc_id)], with_payload=True, with_vector=False
            )
        except Exception as exc:
            raise StoreError(f"reading {tenant}/{doc_id} failed: {exc}") from exc
        versions = [int((p.payload or {}).get("version", 0)) for p in [*points, *tombs]]
        return max(versions) if versions else None

    def count(self, tenant: str | None = None, doc_id: str | None = None) -> int:
        """Points stored, optionally for one tenant and/or document (for checks and tests)."""
        must: list[Any] = [
            _match(k, v) for k, v in (("tenant", tenant), ("doc_id", doc_id)) if v is not None
        ]
        flt = qe.Filter(must=must) if must else None
        try:
            return int(self.shard.count(qe.CountRequest(exact=True, filter=flt)))
        except Exception as exc:
            raise StoreError(f"count in {self.collection} failed: {exc}") from exc

    def optimize(self) -> bool:
        """Build the HNSW index over sealed segments (blocking; worth it on large corpora)."""
        try:
            return bool(self.shard.optimize())
        except Exception as exc:
            raise StoreError(f"optimizing {self.collection} failed: {exc}") from exc

    def close(self) -> None:
        for shard in (self._shard, self._tombs):
            if shard is not None:
                shard.flush()
                shard.close()
        self._shard = self._tombs = None


def _chunk(point_id: object, payload: dict[str, Any], score: float) -> Chunk:
    return Chunk(
        chunk_id=str(point_id),
        doc_id=str(payload.get("doc_id", "")),
        text=str(payload.get("text", "")),
        source=str(payload.get("source", "")),
        score=float(score),
    )
