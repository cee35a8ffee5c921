"""Retrieval stage: the live corpus in, questions with their context out.

Four consumers in one process, because embedded Qdrant can be opened by one
process only: the indexer (documents -> Qdrant, receipts out), the embedding
answerer (callers' texts -> vectors, with the same model), the query path
(questions -> inference jobs, or cached answers straight to the responses),
and the cache filler (answers coming back). All in micro-batches so the
embedding model sees batches.

The indexer shares the loop with the query path rather than running in its own
process: embedded Qdrant is opened by one process only, and both need it. It works
to a time budget per poll instead (KLLM_INDEX_BUDGET_MS): a large document is
embedded a slice at a time, the records not finished are read again uncommitted,
and the query path gets its turn between slices.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from kllm.adapters.retrieval.documents import seed_documents
from kllm.runtime import ledger, logs, metrics, tracing
from kllm.runtime.batch import BatchHandler, BatchRunner, decoded, isolated, run_batches
from kllm.runtime.kafka import make_consumer, make_producer
from kllm.runtime.ready import mark_ready
from kllm.runtime.settings import DOCS_DIR, PROMPTS_DIR, StageSettings
from kllm.runtime.stop import Stop
from processors.cache import ResponseCache
from processors.embeddings import EmbeddingAnswerer
from processors.indexing import Indexer, require_text
from processors.retrieval import PUBLIC_TENANT, Embedder, Retriever, VectorStore
from processors.templates import load_templates
from schemas import Document, EmbeddingRequest, Request, Response
from topics import CACHE_GROUP, EMBEDDING_GROUP, INDEXER_GROUP, RETRIEVAL_GROUP, ConsumerGroup

STAGE = "retrieval"
INDEXER = "indexer"
EMBEDDER = "embeddings"
CACHE = "cache"
log = logging.getLogger(__name__)


class Settings(StageSettings):
    qdrant_url: str = ""
    qdrant_path: Path = Path(".kllm/qdrant")
    collection: str = "kllm_docs"
    seed_dir: Path = DOCS_DIR
    embed_model: str = ""
    embedding_name: str = "all-minilm-l6-v2"
    """The name /v1/embeddings callers ask for the embedding model by."""
    embedding_max_inputs: int = Field(default=256, ge=1)
    """Texts embedded per poll for /v1/embeddings, over however many requests."""
    top_k: int = Field(default=3, ge=0, le=50)
    """Passages retrieved per question; 0 retrieves none (a baseline without RAG)."""
    min_score: float = 0.2
    model_pools: dict[str, str] = Field(default_factory=dict)
    """Model or alias -> inference pool, e.g. {"big": "gpu"}: jobs go to that pool's topic."""
    max_batch: int = 64
    max_wait_ms: float = 5.0
    """How long the query path waits for more questions to batch with the first."""
    chunk_tokens: int = 200
    chunk_overlap_tokens: int = 40
    chunk_chars: int = Field(default=2000, ge=100)
    """A chunk's character cap, beside its token cap (long unbroken runs count as few tokens)."""
    max_context_chars: int = Field(default=6000, ge=0)
    """Characters of retrieved text one inference job carries."""
    max_prompt_tokens: int = Field(default=1536, ge=64)
    """The conversation's token budget, passages included: older turns are left out past it."""
    index_budget_ms: float = Field(default=200.0, gt=0)
    """How long the indexer embeds per poll before the query path gets its turn."""
    index_max_batch: int = Field(default=16, ge=1)
    """Documents per indexer poll (each may be large)."""
    query_retry_s: float = Field(default=15.0, ge=0)
    """How long a question is retried while the embedder or store is down, before its
    caller gets an ``unavailable`` error (the gateway waits 60 s)."""
    index_retry_s: float = Field(default=300.0, ge=0)
    """The same for a document (no caller waits; the corpus should not lose it)."""
    templates_dir: Path = PROMPTS_DIR
    """Versioned prompt templates; requests name the variant ingestion assigned them."""
    cache: bool = True
    cache_similarity: float = Field(default=0.95, gt=0.0, le=1.0)
    """Cosine similarity at or above which an earlier answer is reused."""
    cache_ttl_s: float = Field(default=3600.0, gt=0.0)
    cache_max_per_tenant: int = Field(default=1000, ge=1)


def build(
    settings: Settings, *, embedder: Embedder | None = None, store: VectorStore | None = None
) -> list[tuple[ConsumerGroup, str, BatchHandler]]:
    """The stage's handlers, each with its consumer group and the name it reports (DLQ
    records, spans, metrics), in the order the loop steps them: the
    indexer first (a fresh document is searchable by the next query), the embedding
    answerer, the cache filler (when the cache is on), then the query path. The seed
    corpus is indexed here."""
    if embedder is None:
        from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(
            settings.embed_model or None, threads=settings.torch_threads
        )
    if store is None:
        from kllm.adapters.retrieval.qdrant import open_store

        store = open_store(settings.qdrant_url, settings.qdrant_path, settings.collection)
    store.ensure_collection(embedder.dim)
    cache = (
        ResponseCache(
            settings.cache_similarity, settings.cache_ttl_s, settings.cache_max_per_tenant
        )
        if settings.cache
        else None
    )
    indexer = Indexer(
        embedder,
        store,
        embedder.count_tokens,
        settings.chunk_tokens,
        settings.chunk_overlap_tokens,
        cache=cache,
        max_chars=settings.chunk_chars,
        budget_s=settings.index_budget_ms / 1000,
    )
    if settings.seed_dir.is_dir():
        receipts = indexer.process_batch(seed_documents(settings.seed_dir, PUBLIC_TENANT))
        log.info("seed corpus indexed", extra={"documents": len(receipts)})
    retriever = Retriever(
        embedder,
        store,
        settings.top_k,
        settings.min_score,
        model_pools=settings.model_pools,
        cache=cache,
        templates=load_templates(settings.templates_dir),
        max_context_chars=settings.max_context_chars,
        max_prompt_tokens=settings.max_prompt_tokens,
    )
    index = isolated(
        INDEXER, Document, indexer.process_each, require_text, retry_budget_s=settings.index_retry_s
    )
    embeddings = EmbeddingAnswerer(embedder, settings.embedding_name, settings.embedding_max_inputs)
    embed = isolated(
        EMBEDDER,
        EmbeddingRequest,
        embeddings.process_each,
        retry_budget_s=settings.query_retry_s,
    )
    handlers = [(INDEXER_GROUP, INDEXER, index), (EMBEDDING_GROUP, EMBEDDER, embed)]
    if cache is not None:
        # A side reader of the responses: their own stage reports what it cannot read.
        handlers.append(
            (CACHE_GROUP, CACHE, decoded(CACHE, Response, cache.learn_batch, owner=False))
        )
    query = isolated(STAGE, Request, retriever.process_each, retry_budget_s=settings.query_retry_s)
    handlers.append((RETRIEVAL_GROUP, STAGE, query))
    return handlers


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    handlers = build(settings)
    stage_metrics = metrics.for_stage(STAGE)
    stage_metrics.serve(settings.metrics_port)
    bootstrap = settings.bootstrap()
    fetch_wait = int(settings.consumer_config()["fetch.wait.max.ms"])
    ledger.install_for(bootstrap, [group.inputs[0] for group, _n, _h in handlers], fetch_wait)
    producer = make_producer(bootstrap, settings.producer_config())
    loops = [
        BatchRunner(
            make_consumer(bootstrap, group.name, settings.consumer_config()),
            producer,
            group.inputs[0],
            handler,
            settings.index_max_batch if name == INDEXER else settings.max_batch,
            settings.max_wait_ms / 1000,  # the last, the query path, waits; the others not
            stage_metrics,
            stage=name,
        )
        for group, name, handler in handlers
    ]
    stop = Stop().install()
    mark_ready(settings.ready_file)
    log.info("stage running", extra={"stage": STAGE})
    run_batches(loops, stop)


if __name__ == "__main__":
    main()
