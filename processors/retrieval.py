"""Retrieval: embed the question, search the tenant's chunks, build the prompt.

The question is the conversation's latest user turn, made self-contained when it
is a follow-up (processors.conversation).

Each question gets its own result (processors.batching): a template version this
stage does not know, a search that fails or a job over the record limit fails that
question only; a batch whose embedding fails is split to find the questions that
fail; a store or embedder that fails every question is down, and those questions
are read again later.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kllm.core.errors import ConfigError, PipelineError
from processors.base import Emit, Rejected
from processors.batching import Failed, Result, each, isolate, tried
from processors.cache import Hit, ResponseCache
from processors.conversation import build_messages, search_text, trim_history
from processors.templates import TemplateCatalog
from schemas import Chunk, InferenceJob, Request, Response, RetrievalContext, encode
from topics import INFERENCE, RESPONSES, inference_topic

PUBLIC_TENANT = "public"
"""Chunks every tenant may see (the seed corpus)."""

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question briefly using the numbered "
    "context passages, and cite the passages you used like [1]. If the context "
    "does not contain the answer, say so."
)


MAX_CONTEXT_CHARS = 6000
"""Characters of retrieved text one prompt carries (about 1,500 tokens)."""
MAX_PROMPT_TOKENS = 1536
"""The conversation's budget, passages included: older turns are left out past it
(counted with the embedder's tokenizer, an estimate of the model's). The default
leaves room for an answer in the embedded engine's 2,048-token slots."""
MAX_JOB_BYTES = 900_000
"""An inference job's encoded size limit: under Kafka's default 1 MB record limit, with
room for the record's headers."""


class EmbedderError(PipelineError):
    """The embedding model failed (kllm.adapters.retrieval.embedder translates its errors)."""


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


def cap_context(chunks: Sequence[Chunk], max_chars: int) -> list[Chunk]:
    """The best chunks whose texts fit ``max_chars`` together: the one that crosses the
    limit is cut there, the rest are dropped (a chunk stored before chunks were capped
    in characters, or a huge one from another writer, cannot inflate the job)."""
    out: list[Chunk] = []
    left = max_chars
    for chunk in chunks:
        if left <= 0:
            break
        if len(chunk.text) > left:
            chunk = chunk.model_copy(update={"text": chunk.text[:left]})
        out.append(chunk)
        left -= len(chunk.text)
    return out


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
        max_context_chars: int = MAX_CONTEXT_CHARS,
        max_job_bytes: int = MAX_JOB_BYTES,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.top_k = top_k
        self.min_score = min_score
        self.max_context_chars = max_context_chars
        self.max_job_bytes = max_job_bytes
        self.max_prompt_tokens = max_prompt_tokens
        self.cache = cache
        self.templates = templates
        # Model or alias -> inference pool; unlisted models go to the default pool.
        self.routes = {m: inference_topic(p) for m, p in (model_pools or {}).items()}

    def process(self, request: Request) -> list[Emit]:
        return self.process_batch([request])

    def process_batch(self, requests: Sequence[Request], now: float | None = None) -> list[Emit]:
        """process_each's outputs, raising the first failure (for callers that handle
        a batch as a whole)."""
        results = self.process_each(requests, now)
        out: list[Emit] = []
        for result in results:
            if isinstance(result, Failed):
                raise result.error
            out.extend(result)
        if len(results) < len(requests):
            raise PipelineError("part of the batch was not processed")
        return out

    def process_each(self, requests: Sequence[Request], now: float | None = None) -> list[Result]:
        """One result per request, in order (fewer when a dependency is down: the rest
        are to be read again). Cache hits answer at once; the rest share one embedding
        call (split when it fails), then one search (or one semantic cache hit) each."""
        now = time.time() if now is None else now
        results: list[Result | None] = [None] * len(requests)
        misses: list[int] = []
        for i, request in enumerate(requests):
            hit = self.cache.lookup_exact(request, now) if self.cache else None
            if hit is None:
                misses.append(i)
            else:
                results[i] = [
                    Emit(RESPONSES, request.request_id, cached_response(request, hit, now))
                ]
        if misses:
            self._answer_misses(requests, misses, results, now)
        return tried(results)

    def _answer_misses(
        self,
        requests: Sequence[Request],
        misses: list[int],
        results: list[Result | None],
        now: float,
    ) -> None:
        t0 = time.perf_counter()
        vectors = isolate([search_text(requests[i]) for i in misses], self.embedder.embed)
        embed_ms = (time.perf_counter() - t0) * 1000 / len(misses)
        searched: list[tuple[int, Sequence[float], str]] = []
        for i, vector in zip(misses, vectors, strict=False):  # shorter: the embedder is down
            request = requests[i]
            if isinstance(vector, Failed):
                results[i] = vector
                continue
            if self.cache is not None:
                hit = self.cache.lookup_similar(request, vector, now)
                if hit is not None:
                    results[i] = [
                        Emit(RESPONSES, request.request_id, cached_response(request, hit, now))
                    ]
                    continue
            try:
                system = self._system(request)
            except ConfigError as exc:  # a template version this stage does not know (yet)
                results[i] = Failed(exc, "internal_error")
                continue
            searched.append((i, vector, system))
        answers = each(searched, lambda s: self._job(requests[s[0]], s[1], s[2], embed_ms))
        for (i, used, _system), answer in zip(searched, answers, strict=False):
            if not isinstance(answer, Failed) and self.cache is not None:
                self.cache.expect(requests[i], used, now)
            results[i] = answer  # the ones left out were not searched: the store is down

    def _system(self, request: Request) -> str:
        if self.templates is not None and request.template:
            return self.templates.render(request.template)
        return SYSTEM_PROMPT

    def _job(
        self, request: Request, vector: Sequence[float], system: str, embed_ms: float
    ) -> Result:
        """The request's inference job; raises StoreError when the search fails."""
        t1 = time.perf_counter()
        found = (  # top_k 0: no retrieval at all (a baseline without RAG)
            self.store.search(vector, [request.tenant, PUBLIC_TENANT], self.top_k, self.min_score)
            if self.top_k
            else []
        )
        chunks = cap_context(found, self.max_context_chars)
        context = RetrievalContext(
            request_id=request.request_id,
            chunks=chunks,
            embed_ms=embed_ms,
            search_ms=(time.perf_counter() - t1) * 1000,
        )
        messages, trimmed = trim_history(
            build_messages(request, chunks, system),
            self.embedder.count_tokens,
            self.max_prompt_tokens,
        )
        if trimmed:
            request = request.model_copy(update={"trimmed_turns": trimmed})
        job = InferenceJob(request=request, context=context, messages=messages)
        size = len(encode(job))
        if size > self.max_job_bytes:
            reason = f"inference job of {size} bytes is over the {self.max_job_bytes}-byte limit"
            return Failed(Rejected(reason), "invalid_request")
        topic = self.routes.get(request.model or "", INFERENCE)
        return [Emit(topic, request.request_id, job)]
