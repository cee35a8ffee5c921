"""Small in-memory fakes for the processor Protocols, and builders for valid messages.

No Kafka, no models: everything here runs in microseconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from kllm.core.errors import EngineError
from processors.guardrails import Redaction
from processors.inference import NO_OPTIONS, SAMPLING_FIELDS, Delta, EngineEvent, Finish, Options
from processors.retrieval import StoredChunk
from schemas import Chunk, Generation, InferenceJob, Request, RetrievalContext, Usage
from schemas.chat import ChatTurn


def count_words(text: str) -> int:
    """The fakes' tokenizer: one token per whitespace-separated word."""
    return len(text.split())


class FakeState:
    """A dict-backed KeyedState. Ttls are honoured against ``now`` (a fake clock that
    stays at 0 unless a test moves it); ``ttls`` holds each key's last ttl and
    ``ttl_log`` every write's."""

    def __init__(self) -> None:
        self.now = 0.0
        self.data: dict[str, tuple[Any, float | None]] = {}
        self.ttls: dict[str, timedelta | None] = {}
        self.ttl_log: list[timedelta | None] = []

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.data:
            return default
        value, expires = self.data[key]
        if expires is not None and expires <= self.now:
            del self.data[key]
            return default
        return value

    def set(self, key: str, value: Any, ttl: timedelta | None = None) -> None:
        expires = None if ttl is None else self.now + ttl.total_seconds()
        self.data[key] = (value, expires)
        self.ttls[key] = ttl
        self.ttl_log.append(ttl)


class FakeRedactor:
    """Replaces known strings with their entity type, like presidio would, and reports
    them in text order. Records each text (``calls``) and each batch (``batches``)."""

    def __init__(self, pii: Mapping[str, str]) -> None:
        self.pii = pii
        self.calls: list[str] = []
        self.batches: list[list[str]] = []

    def redact(self, text: str) -> Redaction:
        self.calls.append(text)
        found = sorted((text.index(s), s) for s in self.pii if s in text)
        for _, s in found:
            text = text.replace(s, f"<{self.pii[s]}>")
        return Redaction(text, tuple(self.pii[s] for _, s in found))

    def redact_batch(self, texts: Sequence[str]) -> list[Redaction]:
        self.batches.append(list(texts))
        return [self.redact(t) for t in texts]


class FakeEmbedder:
    """dim 4; deterministic bag-of-words vectors (crc32 of each word picks a dimension).

    Records every ``embed`` call (the texts of each call) in ``calls``; counts tokens
    as whitespace words.
    """

    dim = 4

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    @staticmethod
    def vector(text: str) -> list[float]:
        v = [0.01, 0.01, 0.01, 0.01]  # never the zero vector
        for word in text.lower().split():
            v[zlib.crc32(word.encode()) % 4] += 1.0
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return [self.vector(t) for t in texts]

    def count_tokens(self, text: str) -> int:
        return count_words(text)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


class FakeVectorStore:
    """Point id -> chunk (with its version); cosine search restricted to the given tenants."""

    def __init__(self) -> None:
        self.points: dict[str, StoredChunk] = {}
        self.dim: int | None = None
        self.searches: list[tuple[list[str], int, float]] = []
        self.deletes: list[tuple[str, str]] = []
        self.tombstones: dict[tuple[str, str], int] = {}

    def ensure_collection(self, dim: int) -> None:
        self.dim = dim

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        for c in chunks:
            if self.dim is not None:
                assert len(c.vector) == self.dim
            self.points[c.point_id] = c

    def search(
        self, vector: Sequence[float], tenants: Sequence[str], top_k: int, min_score: float
    ) -> list[Chunk]:
        self.searches.append((list(tenants), top_k, min_score))
        scored = [
            (cosine(vector, c.vector), c) for c in self.points.values() if c.tenant in tenants
        ]
        scored = [(s, c) for s, c in scored if s >= min_score]
        scored.sort(key=lambda sc: (-sc[0], sc[1].point_id))
        return [
            Chunk(chunk_id=c.point_id, doc_id=c.doc_id, text=c.text, score=s, source=c.source)
            for s, c in scored[:top_k]
        ]

    def delete_doc(self, tenant: str, doc_id: str, deleted_version: int | None = None) -> None:
        self.deletes.append((tenant, doc_id))
        for pid in [p for p, c in self.points.items() if (c.tenant, c.doc_id) == (tenant, doc_id)]:
            del self.points[pid]
        if deleted_version is not None:
            self.tombstones[(tenant, doc_id)] = deleted_version

    def doc_version(self, tenant: str, doc_id: str) -> int | None:
        versions = [c.version for c in self.doc_chunks(tenant, doc_id)]
        if (tenant, doc_id) in self.tombstones:
            versions.append(self.tombstones[(tenant, doc_id)])
        return max(versions) if versions else None

    # --- helpers for assertions, not part of the protocol ---

    def doc_chunks(self, tenant: str, doc_id: str) -> list[StoredChunk]:
        return [c for c in self.points.values() if (c.tenant, c.doc_id) == (tenant, doc_id)]

    def tenant_of(self, chunk_id: str) -> str:
        return self.points[chunk_id].tenant


@dataclass
class FakeEngine:
    """A streaming engine: yields ``pieces`` as deltas, then a Finish.

    Failure modes (each raises :class:`EngineError`):
    ``fail_times``: the first N calls fail before any delta; ``always_fail``: every call
    fails before any delta; ``fail_after``: every call fails after emitting k deltas.
    ``delay_s`` sleeps (``asyncio.sleep``) before each delta, to test deadlines.
    """

    model: str = "fake-model"
    slots: int = 2
    pieces: list[str] = field(default_factory=lambda: ["an ", "answer ", "[1]"])
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=lambda: Usage(prompt_tokens=42, completion_tokens=7))
    fail_times: int = 0
    always_fail: bool = False
    fail_after: int | None = None
    delay_s: float = 0.0
    error: str = "out of memory"
    honours: frozenset[str] = SAMPLING_FIELDS | {"response_format"}
    calls: list[tuple[list[ChatTurn], int]] = field(default_factory=list)
    options: list[Options] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    async def stream(
        self, messages: Sequence[ChatTurn], max_tokens: int, options: Options = NO_OPTIONS
    ) -> AsyncIterator[EngineEvent]:
        self.calls.append((list(messages), max_tokens))
        self.options.append(options)
        call = len(self.calls)
        if self.always_fail or call <= self.fail_times:
            raise EngineError(f"{self.error} (call {call})")
        for i, piece in enumerate(self.pieces):
            if self.fail_after is not None and i >= self.fail_after:
                raise EngineError(f"{self.error} after {i} deltas (call {call})")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield Delta(piece)
        if self.fail_after is not None and self.fail_after >= len(self.pieces):
            raise EngineError(f"{self.error} before finishing (call {call})")
        yield Finish(self.finish_reason, self.usage)


class FakeClassifier:
    """Scores each text from a fixed table, or ``default``; records what it scored."""

    name = "fake-clf"

    def __init__(self, scores: dict[str, float] | None = None, default: float = 0.0) -> None:
        self.scores = scores or {}
        self.default = default
        self.calls: list[list[str]] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        self.calls.append(list(texts))
        return [self.scores.get(t, self.default) for t in texts]


# --- message builders -------------------------------------------------------------------


def _make_request(**kw: object) -> Request:
    base: dict[str, object] = {
        "request_id": "req-1",
        "tenant": "acme",
        "prompt": "What is Kafka?",
        "created_at": 1000.0,
    }
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


def _make_chunks() -> list[Chunk]:
    return [
        Chunk(chunk_id="c1", doc_id="d1", text="Kafka is a log.", score=0.9, source="a.md"),
        Chunk(chunk_id="c2", doc_id="d2", text="Topics have partitions.", score=0.5),
    ]


def _make_job(request: Request | None = None, chunks: list[Chunk] | None = None) -> InferenceJob:
    request = request or _make_request()
    chunks = _make_chunks() if chunks is None else chunks
    return InferenceJob(
        request=request,
        context=RetrievalContext(request_id=request.request_id, chunks=chunks),
        messages=[ChatTurn(role="system", content="sys"), ChatTurn(role="user", content="q")],
    )


def _make_generation(**kw: object) -> Generation:
    base: dict[str, object] = {
        "request": _make_request(),
        "chunks": _make_chunks(),
        "text": "Kafka is a distributed log [1].",
        "model": "fake-model",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=10, completion_tokens=5),
        "latency_ms": 33.0,
    }
    base.update(kw)
    return Generation(**base)  # type: ignore[arg-type]


@pytest.fixture
def make_request() -> Callable[..., Request]:
    return _make_request


@pytest.fixture
def make_chunks() -> Callable[[], list[Chunk]]:
    return _make_chunks


@pytest.fixture
def make_job() -> Callable[..., InferenceJob]:
    return _make_job


@pytest.fixture
def make_generation() -> Callable[..., Generation]:
    return _make_generation


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def store() -> FakeVectorStore:
    return FakeVectorStore()


@pytest.fixture
def engine_factory() -> Callable[..., FakeEngine]:
    return FakeEngine


@pytest.fixture
def classifier_factory() -> Callable[..., FakeClassifier]:
    return FakeClassifier


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """kllm.runtime.logs.configure replaces the root handlers; put them back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {n: logging.getLogger(n).level for n in ("quixstreams", "httpx", "urllib3")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in noisy.items():
            logging.getLogger(name).setLevel(lvl)
