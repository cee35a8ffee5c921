"""The live corpus: documents chunked by tokens, embedded in batches, kept current.

An upsert replaces every chunk of the document (old chunks are deleted first,
so a shorter new version leaves nothing behind); a delete removes them. Both
are idempotent, so a redelivered record changes nothing, and a version older
than the one stored is skipped, so a replay never rolls a document back.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from processors.base import Emit, Rejected
from processors.cache import ResponseCache
from processors.retrieval import PUBLIC_TENANT, Embedder, StoredChunk, VectorStore
from schemas import Document, DocumentIndexed
from topics import DOCUMENTS_INDEXED

_CHUNK_NAMESPACE = uuid.UUID("6f1c1d2e-8d0a-4f5e-9a51-2b3c4d5e6f70")
# A sentence ends at . ! or ? followed by space, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")

CountTokens = Callable[[str], int]
IndexOp = Literal["upsert", "delete", "skipped"]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _cut_word(word: str, count: CountTokens, max_tokens: int) -> list[str]:
    """Cut one over-long "word" (a URL, an identifier, text without spaces) by characters."""
    pieces = []
    while word:
        n = len(word)
        while n > 1 and count(word[:n]) > max_tokens:
            n = max(1, min(n - 1, n * max_tokens // max(1, count(word[:n]))))
        pieces.append(word[:n])
        word = word[n:]
    return pieces


def _split_long(sentence: str, count: CountTokens, max_tokens: int) -> list[str]:
    """Cut a sentence longer than the limit at word boundaries (inside a word if need be)."""
    pieces: list[str] = []
    current: list[str] = []
    for word in sentence.split():
        if count(word) > max_tokens:
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.extend(_cut_word(word, count, max_tokens))
            continue
        if current and count(" ".join([*current, word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk_by_tokens(
    text: str, count: CountTokens, max_tokens: int = 200, overlap_tokens: int = 40
) -> list[str]:
    """Pack whole sentences into chunks of at most ``max_tokens`` tokens (as the
    embedding model counts them); each chunk after the first starts with the last
    sentences of the previous one, up to ``overlap_tokens``, so a fact on a
    boundary is whole in one of them."""
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"need 0 <= overlap_tokens < max_tokens, got {overlap_tokens}, {max_tokens}"
        )
    units: list[tuple[str, int]] = []
    for sentence in split_sentences(text):
        n = count(sentence)
        parts = [sentence] if n <= max_tokens else _split_long(sentence, count, max_tokens)
        units.extend((p, n if len(parts) == 1 else count(p)) for p in parts)
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    size = 0
    for unit in units:
        if current and size + unit[1] > max_tokens:
            chunks.append(" ".join(u for u, _ in current))
            carried: list[tuple[str, int]] = []
            carried_size = 0
            for prev in reversed(current):
                if (
                    carried_size + prev[1] > overlap_tokens
                    or carried_size + prev[1] + unit[1] > max_tokens
                ):
                    break
                carried.insert(0, prev)
                carried_size += prev[1]
            current, size = carried, carried_size
        current.append(unit)
        size += unit[1]
    if current:
        chunks.append(" ".join(u for u, _ in current))
    return chunks


def chunk_id(tenant: str, doc_id: str, index: int) -> str:
    """Deterministic point id; tenant and doc id are length-prefixed so no two
    (tenant, doc) pairs can spell the same key."""
    return str(
        uuid.uuid5(_CHUNK_NAMESPACE, f"{len(tenant)}:{tenant}/{len(doc_id)}:{doc_id}#{index}")
    )


@dataclass(frozen=True)
class _Planned:
    doc: Document
    pieces: list[str]


def require_text(doc: Document) -> None:
    """Refuse an upsert with no text: it would delete the document silently."""
    if doc.op == "upsert" and not doc.text.strip():
        raise Rejected("upsert of a document with no text (to remove it, send op=delete)")


class Indexer:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        count_tokens: CountTokens,
        max_tokens: int = 200,
        overlap_tokens: int = 40,
        cache: ResponseCache | None = None,
    ) -> None:
        """``cache``: the response cache whose answers a changed document may have
        sourced; they are dropped when it changes."""
        self.embedder = embedder
        self.store = store
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.cache = cache

    def process_batch(self, docs: Sequence[Document]) -> list[Emit]:
        """Apply a batch of changes; one receipt per document, in the batch's order."""
        receipts = self._apply(docs)
        if self.cache is not None:
            for r in receipts:
                if isinstance(r.message, DocumentIndexed) and r.message.op != "skipped":
                    tenant = r.message.tenant
                    self.cache.invalidate(tenant, everyone=tenant == PUBLIC_TENANT)
        return receipts

    def _apply(self, docs: Sequence[Document]) -> list[Emit]:
        latest: dict[tuple[str, str], Document] = {}
        for doc in docs:  # same key, same partition: later records are newer
            latest[(doc.tenant, doc.doc_id)] = doc
        receipts: dict[tuple[str, str], DocumentIndexed] = {}
        planned: list[_Planned] = []
        for key, doc in latest.items():
            stored = self.store.doc_version(doc.tenant, doc.doc_id)
            if stored is not None and doc.version < stored:
                reason = f"stored version {stored} is newer"
                receipts[key] = self._receipt(doc, "skipped", 0, reason)
            elif doc.op == "delete":
                self.store.delete_doc(doc.tenant, doc.doc_id, deleted_version=doc.version)
                receipts[key] = self._receipt(doc, "delete", 0)
            else:
                pieces = chunk_by_tokens(
                    doc.text, self.count_tokens, self.max_tokens, self.overlap_tokens
                )
                planned.append(_Planned(doc, pieces))
        # One embedding call for every chunk of the batch: the model is fastest in batches.
        texts = [p for plan in planned for p in plan.pieces]
        vectors = self.embedder.embed(texts) if texts else []
        at = 0
        for plan in planned:
            doc = plan.doc
            chunks = [
                StoredChunk(
                    chunk_id(doc.tenant, doc.doc_id, i),
                    doc.tenant,
                    doc.doc_id,
                    piece,
                    doc.source,
                    vectors[at + i],
                    doc.version,
                )
                for i, piece in enumerate(plan.pieces)
            ]
            at += len(plan.pieces)
            self.store.delete_doc(doc.tenant, doc.doc_id)  # a shorter version leaves no old chunk
            self.store.upsert(chunks)
            receipts[(doc.tenant, doc.doc_id)] = self._receipt(doc, "upsert", len(chunks))
        return [Emit(DOCUMENTS_INDEXED, f"{key[0]}/{key[1]}", receipts[key]) for key in latest]

    @staticmethod
    def _receipt(doc: Document, op: IndexOp, chunks: int, reason: str = "") -> DocumentIndexed:
        return DocumentIndexed(
            tenant=doc.tenant,
            doc_id=doc.doc_id,
            version=doc.version,
            op=op,
            chunks=chunks,
            reason=reason,
        )
