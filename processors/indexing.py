"""The live corpus: documents chunked by tokens, embedded in batches, kept current.

An upsert replaces every chunk of the document (old chunks are deleted first,
so a shorter new version leaves nothing behind); a delete removes them. Both
are idempotent, so a redelivered record changes nothing, and a version older
than the one stored is skipped, so a replay never rolls a document back.

Chunks are capped in characters as well as tokens: a tokenizer that reads a long
unbroken run as one unknown token would otherwise let one chunk hold megabytes.

With a time budget, the indexer embeds in slices and stops after the slice that
crosses it, returning the results of the documents it finished: the runner reads
the rest again, uncommitted, after the query path has had its turn. A document
larger than one budget keeps its vectors so far here and goes on where it stopped
when its record comes again.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from kllm.core.errors import PipelineError
from processors.base import Emit, Rejected
from processors.batching import DOWN_AFTER, Failed, Result, isolate
from processors.cache import ResponseCache
from processors.retrieval import PUBLIC_TENANT, Embedder, StoredChunk, VectorStore
from schemas import Document, DocumentIndexed
from topics import DOCUMENTS_INDEXED

_CHUNK_NAMESPACE = uuid.UUID("6f1c1d2e-8d0a-4f5e-9a51-2b3c4d5e6f70")
# A sentence ends at . ! or ? followed by space, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")

CountTokens = Callable[[str], int]
IndexOp = Literal["upsert", "delete", "skipped"]

MAX_CHUNK_CHARS = 2000
"""A chunk's character cap: about twice what 200 tokens of prose take, so prose is cut
by tokens and only long unbroken runs by characters."""
SLICE_CHUNKS = 8
"""Chunks per embedding call when the indexer works to a time budget (8 chunks of 200
tokens took 0.2-0.5 s on one torch thread)."""
SECTION_CHARS = 65_536
"""A document is chunked a section at a time, cut at a sentence end (an 800 kB
document took seconds to chunk at once); no chunk overlaps two sections."""


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


def _cut_chars(sentence: str, max_chars: int) -> list[str]:
    """Cut ``sentence`` into pieces of at most ``max_chars`` characters, at the last
    space that fits (inside a word only when one is longer than the cap)."""
    pieces = []
    rest = sentence
    while len(rest) > max_chars:
        cut = rest.rfind(" ", 1, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


def chunk_by_tokens(
    text: str,
    count: CountTokens,
    max_tokens: int = 200,
    overlap_tokens: int = 40,
    max_chars: int = MAX_CHUNK_CHARS,
) -> list[str]:
    """Pack whole sentences into chunks of at most ``max_tokens`` tokens (as the
    embedding model counts them) and ``max_chars`` characters; each chunk after the
    first starts with the last sentences of the previous one, up to ``overlap_tokens``,
    so a fact on a boundary is whole in one of them."""
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"need 0 <= overlap_tokens < max_tokens, got {overlap_tokens}, {max_tokens}"
        )
    if max_chars < 1:
        raise ValueError(f"need max_chars >= 1, got {max_chars}")
    units: list[tuple[str, int]] = []
    for sentence in split_sentences(text):
        # Characters first: cheap, and it bounds what each token count reads.
        for part in _cut_chars(sentence, max_chars):
            n = count(part)
            parts = [part] if n <= max_tokens else _split_long(part, count, max_tokens)
            units.extend((p, n if len(parts) == 1 else count(p)) for p in parts)
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    size = 0

    def chars(units: Sequence[tuple[str, int]]) -> int:
        return sum(len(u) for u, _ in units) + max(0, len(units) - 1)

    for unit in units:
        if current and (size + unit[1] > max_tokens or chars([*current, unit]) > max_chars):
            chunks.append(" ".join(u for u, _ in current))
            carried: list[tuple[str, int]] = []
            carried_size = 0
            for prev in reversed(current):
                if (
                    carried_size + prev[1] > overlap_tokens
                    or carried_size + prev[1] + unit[1] > max_tokens
                    or chars([prev, *carried, unit]) > max_chars
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


def next_section(text: str, size: int = SECTION_CHARS) -> tuple[str, str]:
    """``text`` cut after its last sentence end (else space) within ``size`` characters:
    (section, rest)."""
    if len(text) <= size:
        return text, ""
    window = text[:size]
    ends = [m.end() for m in _SENTENCE_END.finditer(window)]
    cut = ends[-1] if ends else (window.rfind(" ") + 1 or size)
    return text[:cut], text[cut:]


@dataclass
class _Plan:
    """An upsert being embedded: its chunks so far, the text not chunked yet, and the
    vectors of the chunks embedded so far."""

    index: int
    doc: Document
    rest: str
    pieces: list[str] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return not self.rest and len(self.vectors) == len(self.pieces)


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
        *,
        max_chars: int = MAX_CHUNK_CHARS,
        budget_s: float | None = None,
        slice_chunks: int = SLICE_CHUNKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``cache``: the response cache whose answers a changed document may have
        sourced; they are dropped when it changes. ``budget_s``: how long one call may
        embed before it stops (None: the whole batch, in one embedding call)."""
        self.embedder = embedder
        self.store = store
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.max_chars = max_chars
        self.cache = cache
        self.budget_s = budget_s
        self.slice_chunks = slice_chunks
        self.clock = clock
        self._progress: _Plan | None = None
        """The document a call stopped in, with its vectors so far."""

    def process_batch(self, docs: Sequence[Document]) -> list[Emit]:
        """Apply a batch of changes (all of it: no budget); one receipt per document.
        Raises the first failure."""
        budget, self.budget_s = self.budget_s, None
        try:
            results = self.process_each(docs)
        finally:
            self.budget_s = budget
        out: list[Emit] = []
        for result in results:
            if isinstance(result, Failed):
                raise result.error
            out.extend(result)
        if len(results) < len(docs):
            raise PipelineError("part of the batch was not indexed")
        return out

    def process_each(self, docs: Sequence[Document]) -> list[Result]:
        """One result per document, in order: its receipt, nothing (a later record of the
        same document in the batch replaces it), or Failed. Fewer results than
        documents when the time budget ran out or a dependency is down: the rest are
        to be read again."""
        results = _Run(self, docs).run()
        if self.cache is not None:
            for result in results:
                for r in result if isinstance(result, list) else []:
                    if isinstance(r.message, DocumentIndexed) and r.message.op != "skipped":
                        tenant = r.message.tenant
                        self.cache.invalidate(tenant, everyone=tenant == PUBLIC_TENANT)
        return results

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


class _Run:
    """One process_each call: plans documents in order, embeds their chunks in slices,
    writes each document once its chunks are embedded."""

    def __init__(self, indexer: Indexer, docs: Sequence[Document]) -> None:
        self.ix = indexer
        self.docs = docs
        last = {(d.tenant, d.doc_id): i for i, d in enumerate(docs)}
        # Same key, same partition: a later record is newer, and only the last applies.
        self.superseded = {i for i, d in enumerate(docs) if last[(d.tenant, d.doc_id)] != i}
        self.results: dict[int, Result] = {}
        self.queue: list[_Plan] = []
        self.next = 0
        self.deadline = None if indexer.budget_s is None else indexer.clock() + indexer.budget_s
        self.worked = False
        self.stopped = False
        self.store_failures = 0
        self.last_success = -1

    def run(self) -> list[Result]:
        while not self.stopped:
            self._plan()
            if not self.queue or self.stopped:
                break
            if self._out_of_time():
                break
            self._embed_slice()
            self._write_embedded()
        for plan in self.queue:  # stopped in it: its vectors so far are kept
            if (plan.vectors or plan.pieces) and not plan.embedded:
                self.ix._progress = plan
                break
        out: list[Result] = []
        for i in range(len(self.docs)):
            if i not in self.results:
                break  # this one and the rest are read again
            out.append(self.results[i])
        return out

    def _out_of_time(self) -> bool:
        return self.worked and self.deadline is not None and self.ix.clock() >= self.deadline

    def _waiting(self) -> int:
        return sum(len(p.pieces) - len(p.vectors) for p in self.queue)

    def _plan(self) -> None:
        """Plan documents until a slice's worth of chunks waits to be embedded (all of
        them without a budget)."""
        ix = self.ix
        while self.next < len(self.docs) and not self.stopped:
            if self.deadline is not None and self._waiting() >= ix.slice_chunks:
                return
            if self._out_of_time():
                return
            i, doc = self.next, self.docs[self.next]
            self.next += 1
            if i in self.superseded:
                self.results[i] = []
                continue
            progress = ix._progress
            if progress is not None and progress.doc == doc:
                progress.index = i
                self.queue.append(progress)
                ix._progress = None
                continue
            self._store(i, partial(self._change, i, doc))

    def _change(self, i: int, doc: Document) -> None:
        ix = self.ix
        stored = ix.store.doc_version(doc.tenant, doc.doc_id)
        if stored is not None and doc.version < stored:
            reason = f"stored version {stored} is newer"
            self.results[i] = [_emit(Indexer._receipt(doc, "skipped", 0, reason))]
        elif doc.op == "delete":
            ix.store.delete_doc(doc.tenant, doc.doc_id, deleted_version=doc.version)
            self.results[i] = [_emit(Indexer._receipt(doc, "delete", 0))]
            self.worked = True
        else:
            plan = _Plan(i, doc, doc.text)
            self._chunk(plan, None if self.deadline is None else ix.slice_chunks)
            self.queue.append(plan)

    def _chunk(self, plan: _Plan, wanted: int | None) -> None:
        """Chunk ``plan``'s text, a section at a time, until ``wanted`` chunks wait to be
        embedded (None: all of it)."""
        ix = self.ix
        while plan.rest and (wanted is None or len(plan.pieces) - len(plan.vectors) < wanted):
            section, plan.rest = next_section(plan.rest)
            plan.pieces.extend(
                chunk_by_tokens(
                    section, ix.count_tokens, ix.max_tokens, ix.overlap_tokens, ix.max_chars
                )
            )

    def _store(self, i: int, write: Callable[[], None]) -> None:
        """Run one document's store calls; its failure is its own, until DOWN_AFTER in a
        row say the store is down: then they are retried later, with the rest."""
        try:
            write()
        except PipelineError as exc:
            self.store_failures += 1
            self.results[i] = Failed(exc, "internal_error")
            if self.store_failures >= DOWN_AFTER:
                self._down()
            return
        self.store_failures = 0
        self.last_success = i

    def _down(self) -> None:
        """The failures since the last success are the store's: retried later."""
        for i, result in self.results.items():
            if isinstance(result, Failed) and i > self.last_success:
                self.results[i] = Failed(result.error, result.code, retry=True)
        self.stopped = True

    def _embed_slice(self) -> None:
        limit = self.ix.slice_chunks if self.deadline is not None else None
        wanted: list[tuple[_Plan, int]] = []
        for plan in self.queue:
            if limit is not None and len(wanted) >= limit:
                break
            self._chunk(plan, None if limit is None else limit - len(wanted))
            for k in range(len(plan.vectors), len(plan.pieces)):
                if limit is not None and len(wanted) >= limit:
                    break
                wanted.append((plan, k))
        if not wanted:
            return
        vectors = isolate([p.pieces[k] for p, k in wanted], self.ix.embedder.embed)
        self.worked = True
        failed: set[int] = set()
        for (plan, _k), vector in zip(wanted, vectors, strict=False):
            if plan.index in failed:
                continue
            if isinstance(vector, Failed):
                self.results[plan.index] = vector
                failed.add(plan.index)
                if vector.retry:
                    self.stopped = True
                continue
            plan.vectors.append(vector)
        if len(vectors) < len(wanted):
            self.stopped = True  # the embedder is down: the rest come again
        self.queue = [p for p in self.queue if p.index not in failed]

    def _write_embedded(self) -> None:
        while self.queue and self.queue[0].embedded and not self.stopped:
            plan = self.queue.pop(0)
            self._store(plan.index, partial(self._write, plan))

    def _write(self, plan: _Plan) -> None:
        doc = plan.doc
        chunks = [
            StoredChunk(
                chunk_id(doc.tenant, doc.doc_id, i),
                doc.tenant,
                doc.doc_id,
                piece,
                doc.source,
                vector,
                doc.version,
            )
            for i, (piece, vector) in enumerate(zip(plan.pieces, plan.vectors, strict=True))
        ]
        self.ix.store.delete_doc(doc.tenant, doc.doc_id)  # a shorter version leaves no old chunk
        self.ix.store.upsert(chunks)
        self.results[plan.index] = [_emit(Indexer._receipt(doc, "upsert", len(chunks)))]


def _emit(receipt: DocumentIndexed) -> Emit:
    return Emit(DOCUMENTS_INDEXED, f"{receipt.tenant}/{receipt.doc_id}", receipt)
