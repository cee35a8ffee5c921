"""Retrieval stage: llm.retrieval -> llm.inference, searching Qdrant for context.

Owns the vector store: in embedded mode only one process may open it, so the
seed corpus is indexed here at start-up (idempotent: chunk ids are deterministic).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from kllm import logs
from kllm.settings import StageSettings
from processors.dispatch import StageLogic
from processors.retrieval import Embedder, Retriever, VectorStore, index_documents
from schemas import Request
from services.runtime import serve
from topics import RETRIEVAL

STAGE = "retrieval"
log = logging.getLogger(__name__)


class Settings(StageSettings):
    qdrant_url: str = ""
    qdrant_path: Path = Path(".kllm/qdrant")
    collection: str = "kllm_docs"
    seed_dir: Path = Path("docs")
    embed_model: str = ""
    top_k: int = 2
    min_score: float = 0.2
    model_pools: dict[str, str] = Field(default_factory=dict)
    """Model or alias -> inference pool, e.g. {"big": "gpu"}: jobs go to that pool's topic."""


def seed_documents(seed_dir: Path) -> list[tuple[str, str, str]]:
    files = sorted(p for p in seed_dir.glob("**/*") if p.suffix in {".md", ".txt"})
    # The path relative to the folder is the id: two README.md in subfolders stay distinct.
    ids = [p.relative_to(seed_dir).with_suffix("").as_posix() for p in files]
    return [(i, p.name, p.read_text(encoding="utf-8")) for i, p in zip(ids, files, strict=True)]


def build(
    settings: Settings, *, embedder: Embedder | None = None, store: VectorStore | None = None
) -> StageLogic[Request]:
    if embedder is None:
        from kllm.adapters.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(settings.embed_model or None)
    if store is None:
        from kllm.adapters.qdrant import QdrantStore, open_client

        store = QdrantStore(
            open_client(settings.qdrant_url, settings.qdrant_path), settings.collection
        )
    store.ensure_collection(embedder.dim)
    if settings.seed_dir.is_dir():
        n = index_documents(seed_documents(settings.seed_dir), embedder, store)
        log.info("seed corpus indexed", extra={"chunks": n, "seed_dir": str(settings.seed_dir)})
    retriever = Retriever(
        embedder, store, settings.top_k, settings.min_score, model_pools=settings.model_pools
    )
    return StageLogic(STAGE, Request, retriever.process)


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    serve(settings, RETRIEVAL, build(settings))


if __name__ == "__main__":
    main()
