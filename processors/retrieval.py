"""Retrieval: embed the question, search the tenant's chunks, build the prompt."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from processors.base import Emit
from schemas import Chunk, InferenceJob, Request, RetrievalContext
from schemas.messages import ChatTurn
from topics import INFERENCE, inference_topic

PUBLIC_TENANT = "public"
"""Chunks every tenant may see (the seed corpus)."""

_CHUNK_NAMESPACE = uuid.UUID("6f1c1d2e-8d0a-4f5e-9a51-2b3c4d5e6f70")

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question briefly using the numbered "
    "context passages, and cite the passages you used like [1]. If the context "
    "does not contain the answer, say so."
)


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as it is written to the vector store."""

    point_id: str
    tenant: str
    doc_id: str
    text: str
    source: str
    vector: list[float]


class VectorStore(Protocol):
    def ensure_collection(self, dim: int) -> None: ...

    def upsert(self, chunks: Sequence[StoredChunk]) -> None: ...

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]: ...


def chunk_text(text: str, max_chars: int = 600, overlap: int = 100) -> list[str]:
    """Split on paragraph boundaries into pieces of at most ``max_chars``.

    A paragraph longer than the limit is cut into windows that overlap by
    ``overlap`` characters, so a sentence on a cut is whole in one of them.
    """
    if not 0 <= overlap < max_chars:
        raise ValueError(
            f"need 0 <= overlap < max_chars, got overlap={overlap}, max_chars={max_chars}"
        )
    pieces: list[str] = []
    current = ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if len(para) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            step = max_chars - overlap
            pieces.extend(para[i : i + max_chars] for i in range(0, len(para) - overlap, step))
        elif len(current) + len(para) + 2 > max_chars:
            if current:
                pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def chunk_id(tenant: str, doc_id: str, index: int) -> str:
    """Deterministic point id: re-indexing a document overwrites, never duplicates."""
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{tenant}/{doc_id}#{index}"))


def index_documents(
    docs: Iterable[tuple[str, str, str]],
    embedder: Embedder,
    store: VectorStore,
    tenant: str = PUBLIC_TENANT,
    batch_size: int = 64,
) -> int:
    """Chunk, embed and upsert ``(doc_id, source, text)`` documents. Returns chunks written."""
    pending: list[tuple[str, str, str, str]] = []
    for doc_id, source, text in docs:
        for i, piece in enumerate(chunk_text(text)):
            pending.append((chunk_id(tenant, doc_id, i), doc_id, source, piece))
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        vectors = embedder.embed([p[3] for p in batch])
        store.upsert(
            [
                StoredChunk(pid, tenant, doc_id, text, source, vec)
                for (pid, doc_id, source, text), vec in zip(batch, vectors, strict=True)
            ]
        )
    return len(pending)


def build_messages(question: str, chunks: Sequence[Chunk]) -> list[ChatTurn]:
    context = "\n\n".join(f"[{i}] {c.text}" for i, c in enumerate(chunks, start=1))
    user = f"Context:\n{context}\n\nQuestion: {question}" if chunks else question
    return [ChatTurn(role="system", content=SYSTEM_PROMPT), ChatTurn(role="user", content=user)]


class Retriever:
    """Turns a request into an inference job carrying its context and prompt."""

    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        top_k: int = 3,
        min_score: float = 0.2,
        model_pools: Mapping[str, str] | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.top_k = top_k
        self.min_score = min_score
        # Model or alias -> inference pool; unlisted models go to the default pool.
        self.routes = {m: inference_topic(p) for m, p in (model_pools or {}).items()}

    def process(self, request: Request) -> list[Emit]:
        t0 = time.perf_counter()
        (vector,) = self.embedder.embed([request.prompt])
        t1 = time.perf_counter()
        tenants = [request.tenant, PUBLIC_TENANT]
        chunks = self.store.search(vector, tenants, self.top_k, self.min_score)
        t2 = time.perf_counter()
        context = RetrievalContext(
            request_id=request.request_id,
            chunks=chunks,
            embed_ms=(t1 - t0) * 1000,
            search_ms=(t2 - t1) * 1000,
        )
        job = InferenceJob(
            request=request, context=context, messages=build_messages(request.prompt, chunks)
        )
        topic = self.routes.get(request.model or "", INFERENCE)
        return [Emit(topic, request.request_id, job)]
