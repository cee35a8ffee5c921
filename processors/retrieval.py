"""Retrieval: embed the question, search the tenant's chunks, build the prompt."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from processors.base import Emit
from processors.cache import Hit, ResponseCache
from processors.templates import TemplateCatalog
from schemas import Chunk, InferenceJob, Request, Response, RetrievalContext
from schemas.messages import ChatTurn
from topics import INFERENCE, RESPONSES, inference_topic

PUBLIC_TENANT = "public"
"""Chunks every tenant may see (the seed corpus)."""

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question briefly using the numbered "
    "context passages, and cite the passages you used like [1]. If the context "
    "does not contain the answer, say so."
)


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model sees them (chunks must fit its window)."""
        ...


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as it is written to the vector store."""

    point_id: str
    tenant: str
    doc_id: str
    text: str
    source: str
    vector: list[float]
    version: int = 0


class VectorStore(Protocol):
    def ensure_collection(self, dim: int) -> None: ...

    def upsert(self, chunks: Sequence[StoredChunk]) -> None: ...

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]: ...

    def delete_doc(self, tenant: str, doc_id: str, deleted_version: int | None = None) -> None:
        """Remove the document's chunks; with ``deleted_version``, remember that version
        was deleted, so an older upsert replayed later cannot bring the document back."""
        ...

    def doc_version(self, tenant: str, doc_id: str) -> int | None:
        """The newest version stored or deleted; None when the store never saw the document."""
        ...


def build_messages(
    question: str, chunks: Sequence[Chunk], system: str = SYSTEM_PROMPT
) -> list[ChatTurn]:
    context = "\n\n".join(f"[{i}] {c.text}" for i, c in enumerate(chunks, start=1))
    user = f"Context:\n{context}\n\nQuestion: {question}" if chunks else question
    return [ChatTurn(role="system", content=system), ChatTurn(role="user", content=user)]


def cached_response(request: Request, hit: Hit, now: float) -> Response:
    a = hit.answer
    return Response(
        request_id=request.request_id,
        tenant=request.tenant,
        text=a.text,
        verdict=a.verdict,
        reasons=[f"cache hit ({hit.kind}, similarity {hit.similarity:.3f})"],
        model=a.model,
        finish_reason=a.finish_reason,
        citations=list(a.citations),
        pipeline_ms=max(0.0, (now - request.created_at) * 1000),
        template=request.template,
        cached=True,
    )


class Retriever:
    """Turns a request into an inference job carrying its context and prompt."""

    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        top_k: int = 3,
        min_score: float = 0.2,
        model_pools: Mapping[str, str] | None = None,
        *,
        cache: ResponseCache | None = None,
        templates: TemplateCatalog | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.top_k = top_k
        self.min_score = min_score
        self.cache = cache
        self.templates = templates
        # Model or alias -> inference pool; unlisted models go to the default pool.
        self.routes = {m: inference_topic(p) for m, p in (model_pools or {}).items()}

    def process(self, request: Request) -> list[Emit]:
        return self.process_batch([request])

    def process_batch(self, requests: Sequence[Request], now: float | None = None) -> list[Emit]:
        """Cache hits answer at once; the rest share one embedding call, then one search
        (or one semantic cache hit) each."""
        now = time.time() if now is None else now
        out: list[Emit] = []
        misses = []
        for request in requests:
            hit = self.cache.lookup_exact(request, now) if self.cache else None
            if hit is None:
                misses.append(request)
            else:
                out.append(Emit(RESPONSES, request.request_id, cached_response(request, hit, now)))
        if not misses:
            return out
        t0 = time.perf_counter()
        vectors = self.embedder.embed([r.prompt for r in misses])
        embed_ms = (time.perf_counter() - t0) * 1000 / len(misses)
        for request, vector in zip(misses, vectors, strict=True):
            if self.cache is not None:
                hit = self.cache.lookup_similar(request, vector, now)
                if hit is not None:
                    response = cached_response(request, hit, now)
                    out.append(Emit(RESPONSES, request.request_id, response))
                    continue
                self.cache.expect(request, vector, now)
            out.append(self._job(request, vector, embed_ms))
        return out

    def _job(self, request: Request, vector: Sequence[float], embed_ms: float) -> Emit:
        t1 = time.perf_counter()
        chunks = self.store.search(
            vector, [request.tenant, PUBLIC_TENANT], self.top_k, self.min_score
        )
        context = RetrievalContext(
            request_id=request.request_id,
            chunks=chunks,
            embed_ms=embed_ms,
            search_ms=(time.perf_counter() - t1) * 1000,
        )
        system = SYSTEM_PROMPT
        if self.templates is not None and request.template:
            system = self.templates.render(request.template)
        messages = build_messages(request.prompt, chunks, system)
        job = InferenceJob(request=request, context=context, messages=messages)
        topic = self.routes.get(request.model or "", INFERENCE)
        return Emit(topic, request.request_id, job)
