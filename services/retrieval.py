"""Retrieval stage: the live corpus in, questions with their context out.

Three consumers in one process, because embedded Qdrant can be opened by one
process only: the indexer (documents -> Qdrant, receipts out), the query path
(questions -> inference jobs, or cached answers straight to the responses),
and the cache filler (answers coming back). All in micro-batches so the
embedding model sees batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from kllm.adapters.retrieval.documents import document_for
from kllm.runtime import logs, metrics, tracing
from kllm.runtime.batch import BatchHandler, BatchRunner, run_batches
from kllm.runtime.dispatch import RecordRef, decode_batch
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import DOCS_DIR, PROMPTS_DIR, StageSettings
from kllm.runtime.stop import Stop
from processors.base import Emit, Rejected
from processors.cache import ResponseCache
from processors.indexing import Indexer
from processors.retrieval import PUBLIC_TENANT, Embedder, Retriever, VectorStore
from processors.templates import load_templates
from schemas import Document, DocumentIndexed, Request, Response
from topics import CACHE_GROUP, INDEXER_GROUP, RETRIEVAL_GROUP, ConsumerGroup

STAGE = "retrieval"
INDEXER = "indexer"
CACHE = "cache"
log = logging.getLogger(__name__)


class Settings(StageSettings):
    qdrant_url: str = ""
    qdrant_path: Path = Path(".kllm/qdrant")
    collection: str = "kllm_docs"
    seed_dir: Path = DOCS_DIR
    embed_model: str = ""
    top_k: int = 2
    min_score: float = 0.2
    model_pools: dict[str, str] = Field(default_factory=dict)
    """Model or alias -> inference pool, e.g. {"big": "gpu"}: jobs go to that pool's topic."""
    max_batch: int = 64
    max_wait_ms: float = 5.0
    """How long the query path waits for more questions to batch with the first."""
    chunk_tokens: int = 200
    chunk_overlap_tokens: int = 40
    templates_dir: Path = PROMPTS_DIR
    """Versioned prompt templates; requests name the variant ingestion assigned them."""
    cache: bool = True
    cache_similarity: float = Field(default=0.95, gt=0.0, le=1.0)
    """Cosine similarity at or above which an earlier answer is reused."""
    cache_ttl_s: float = Field(default=3600.0, gt=0.0)
    cache_max_per_tenant: int = Field(default=1000, ge=1)


def seed_documents(seed_dir: Path) -> list[Document]:
    """The seed corpus (Markdown and text files) as public documents, read as `kllm ingest`
    reads files: the relative path is the id, the mtime the version."""
    files = sorted(p for p in seed_dir.glob("**/*") if p.suffix in {".md", ".txt"})
    return [document_for(p, seed_dir, PUBLIC_TENANT) for p in files]


def build(
    settings: Settings, *, embedder: Embedder | None = None, store: VectorStore | None = None
) -> tuple[Retriever, Indexer]:
    if embedder is None:
        from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(
            settings.embed_model or None, threads=settings.torch_threads
        )
    if store is None:
        from kllm.adapters.retrieval.qdrant import open_store

        store = open_store(settings.qdrant_url, settings.qdrant_path, settings.collection)
    store.ensure_collection(embedder.dim)
    indexer = Indexer(
        embedder, store, embedder.count_tokens, settings.chunk_tokens, settings.chunk_overlap_tokens
    )
    if settings.seed_dir.is_dir():
        receipts = indexer.process_batch(seed_documents(settings.seed_dir))
        log.info("seed corpus indexed", extra={"documents": len(receipts)})
    cache = (
        ResponseCache(
            settings.cache_similarity, settings.cache_ttl_s, settings.cache_max_per_tenant
        )
        if settings.cache
        else None
    )
    retriever = Retriever(
        embedder,
        store,
        settings.top_k,
        settings.min_score,
        model_pools=settings.model_pools,
        cache=cache,
        templates=load_templates(settings.templates_dir),
    )
    return retriever, indexer


def _has_text(doc: Document) -> None:
    if doc.op == "upsert" and not doc.text.strip():
        raise Rejected("upsert of a document with no text (to remove it, send op=delete)")


def query_handler(retriever: Retriever) -> BatchHandler:
    def handle(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
        requests, rejected = decode_batch(STAGE, records, Request)
        return rejected + retriever.process_batch(requests)

    return handle


def cache_fill_handler(cache: ResponseCache) -> BatchHandler:
    """Answers coming back fill the cache for the questions this process embedded."""

    def handle(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
        responses, _ = decode_batch(CACHE, records, Response, owner=False)
        now = time.time()
        stored = sum(cache.learn_one(r, now) for r in responses)
        if stored:
            log.info("cache filled", extra={"stored": stored, "entries": len(cache)})
        return []

    return handle


def document_handler(indexer: Indexer, cache: ResponseCache | None = None) -> BatchHandler:
    def handle(records: Sequence[tuple[RecordRef, bytes]]) -> list[Emit]:
        docs, rejected = decode_batch(INDEXER, records, Document, _has_text)
        receipts = indexer.process_batch(docs)
        if cache is not None:
            # A changed document may be the source of cached answers: drop them.
            for r in receipts:
                if isinstance(r.message, DocumentIndexed) and r.message.op != "skipped":
                    tenant = r.message.tenant
                    cache.invalidate(tenant, everyone=tenant == PUBLIC_TENANT)
        return rejected + receipts

    return handle


def runners(settings: Settings, retriever: Retriever, indexer: Indexer) -> list[BatchRunner]:
    """The indexer, the cache filler and the query path, in the order they are stepped."""
    stage_metrics = metrics.for_stage(STAGE)
    bootstrap = settings.bootstrap()
    producer = make_producer(bootstrap, settings.producer_config())

    def runner(
        group: ConsumerGroup, handler: BatchHandler, stage: str, wait_s: float
    ) -> BatchRunner:
        consumer = make_consumer(bootstrap, group.name, settings.consumer_config())
        return BatchRunner(
            consumer,
            producer,
            group.inputs[0],
            handler,
            settings.max_batch,
            wait_s,
            stage_metrics,
            stage=stage,
        )

    out = [runner(INDEXER_GROUP, document_handler(indexer, retriever.cache), INDEXER, 0)]
    if retriever.cache is not None:
        out.append(runner(CACHE_GROUP, cache_fill_handler(retriever.cache), CACHE, 0))
    out.append(
        runner(RETRIEVAL_GROUP, query_handler(retriever), STAGE, settings.max_wait_ms / 1000)
    )
    return out


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    retriever, indexer = build(settings)
    metrics.for_stage(STAGE).serve(settings.metrics_port)
    loops = runners(settings, retriever, indexer)
    stop = Stop().install()
    mark_ready(settings.ready_file)
    log.info("stage running", extra={"stage": STAGE})
    # Documents first: a fresh document is searchable by the next query.
    run_batches(loops, stop)


if __name__ == "__main__":
    main()
