from __future__ import annotations

import itertools
import math
import random
import uuid
from typing import Any

import pytest

from processors.cache import ResponseCache
from processors.indexing import Indexer, chunk_by_tokens, chunk_id, split_sentences
from schemas import Document, DocumentIndexed
from tests.unit.conftest import count_words
from tests.unit.test_cache import E1, NOW, req, resp
from topics import DOCUMENTS_INDEXED


def subword_tokens(text: str) -> int:
    """A tokenizer-like counter: a word of n characters is ceil(n / 3) tokens."""
    return sum(math.ceil(len(w) / 3) for w in text.split())


def _sentence(words: int, start: int = 0, end: str = ".") -> str:
    return " ".join(f"w{i}" for i in range(start, start + words)) + end


def _has_words(chunk: str, piece: str) -> bool:
    """``piece`` occurs in ``chunk`` as whole words."""
    return f" {' '.join(piece.split())} " in f" {' '.join(chunk.split())} "


# --- split_sentences -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("  Padded.   Spaces.  ", ["Padded.", "Spaces."]),
        ("Title\n\nBody without a stop", ["Title", "Body without a stop"]),
        ("Para one\n \n\t\nPara two", ["Para one", "Para two"]),
        ("End of line.\nNext line.", ["End of line.", "Next line."]),
        ("line one\nline two", ["line one\nline two"]),
        ("version 1.2 and 3.14 stay whole", ["version 1.2 and 3.14 stay whole"]),
        ("Really?! Yes...  Ok", ["Really?!", "Yes...", "Ok"]),
        ("", []),
        ("   \n\n \t \n\n", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


# --- chunk_by_tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\n\n"])
def test_chunk_empty_text(text: str) -> None:
    assert chunk_by_tokens(text, count_words, 10, 2) == []


def test_chunk_short_text_is_one_chunk() -> None:
    assert chunk_by_tokens("One two.  Three four.", count_words, 10, 2) == ["One two. Three four."]


# Six sentences of three words: three fit in a chunk of nine.
SIX = [_sentence(3, 3 * i) for i in range(6)]


def test_chunk_overlap_repeats_the_last_sentences() -> None:
    s = SIX
    chunks = chunk_by_tokens(" ".join(s), count_words, max_tokens=9, overlap_tokens=3)
    assert chunks == [
        " ".join([s[0], s[1], s[2]]),
        " ".join([s[2], s[3], s[4]]),
        " ".join([s[4], s[5]]),
    ]


def test_chunk_overlap_takes_as_many_sentences_as_fit() -> None:
    s = SIX
    chunks = chunk_by_tokens(" ".join(s), count_words, max_tokens=9, overlap_tokens=6)
    # Two sentences carried (6 tokens), plus the next one: 9.
    assert chunks[:2] == [" ".join(s[0:3]), " ".join(s[1:4])]
    for prev, nxt in itertools.pairwise(chunks):
        a, b = split_sentences(prev), split_sentences(nxt)
        assert b[:2] == a[-2:]
        assert count_words(nxt) <= 9


def test_chunk_without_overlap_partitions_the_sentences() -> None:
    s = SIX
    chunks = chunk_by_tokens(" ".join(s), count_words, max_tokens=9, overlap_tokens=0)
    assert chunks == [" ".join(s[0:3]), " ".join(s[3:6])]
    sentences = [x for c in chunks for x in split_sentences(c)]
    assert sentences == s  # nothing repeated, nothing lost


def test_chunk_overlap_never_pushes_a_chunk_over_the_limit() -> None:
    # After "a", the 8-token sentence "b" would not fit beside the carried one.
    a, b = _sentence(2, 0), _sentence(8, 100)
    chunks = chunk_by_tokens(f"{a} {b}", count_words, max_tokens=9, overlap_tokens=3)
    assert chunks == [a, b]


def test_chunk_long_sentence_is_cut_at_words() -> None:
    long = _sentence(23, 100)
    text = f"{_sentence(2)} {long} {_sentence(2, 50)}"
    chunks = chunk_by_tokens(text, count_words, max_tokens=10, overlap_tokens=0)
    assert all(count_words(c) <= 10 for c in chunks)
    words = long.split()
    # The long sentence is cut into pieces of whole words, in order, each within the limit.
    assert " ".join(chunks).split() == text.split()
    assert any(_has_words(c, " ".join(words[:10])) for c in chunks)
    for w in words:
        assert any(w in c.split() for c in chunks)


def test_chunk_long_sentence_respects_a_subword_counter() -> None:
    long = " ".join(["abcdef"] * 9) + "."  # 9 words of 2 tokens each
    chunks = chunk_by_tokens(long, subword_tokens, max_tokens=5, overlap_tokens=0)
    assert chunks == ["abcdef abcdef", "abcdef abcdef", "abcdef abcdef", "abcdef abcdef", "abcdef."]
    assert all(subword_tokens(c) <= 5 for c in chunks)


def test_chunk_word_longer_than_the_limit_is_still_cut() -> None:
    text = "short words. " + "x" * 30 + " tail."
    chunks = chunk_by_tokens(text, subword_tokens, max_tokens=4, overlap_tokens=0)
    assert all(subword_tokens(c) <= 4 for c in chunks), chunks


@pytest.mark.parametrize(("max_tokens", "overlap"), [(10, 10), (10, 11), (5, -1), (0, 0)])
def test_chunk_invalid_overlap(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_by_tokens("anything.", count_words, max_tokens, overlap)


def _random_text(rng: random.Random) -> tuple[str, list[str]]:
    """Sentences of random words; every word is distinct (so positions can be traced)
    and at most 8 characters with its stop (3 tokens by ``subword_tokens``)."""
    sentences = []
    serial = itertools.count()
    for _ in range(rng.randint(0, 12)):
        words = [
            "".join(rng.choices("abcdefgh", k=rng.randint(0, 4))) + str(next(serial))
            for _ in range(rng.randint(1, 30))
        ]
        sentences.append(" ".join(words) + rng.choice(".!?"))
    seps = [rng.choice([" ", "  ", "\n", "\n\n"]) for _ in sentences]
    return "".join(s + sep for s, sep in zip(sentences, seps, strict=True)), sentences


def _covers(sentence: str, chunks: list[str]) -> bool:
    """Every word of ``sentence`` lies in a run of its words found whole in some chunk."""
    words = sentence.split()
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and any(_has_words(c, " ".join(words[i : j + 1])) for c in chunks):
            j += 1
        if j == i:
            return False
        i = j
    return True


@pytest.mark.parametrize("seed", range(200))
def test_chunk_random_sizes_and_coverage(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.choice([count_words, subword_tokens])
    # No word exceeds the limit on its own (see the over-long word test above for that case).
    max_tokens = rng.randint(1 if count is count_words else 3, 40)
    overlap = rng.randint(0, max_tokens - 1)
    text, sentences = _random_text(rng)
    chunks = chunk_by_tokens(text, count, max_tokens, overlap)

    assert all(0 < count(c) <= max_tokens for c in chunks), (max_tokens, chunks)
    for s in sentences:
        if count(s) <= max_tokens:
            assert any(_has_words(c, s) for c in chunks), s  # a sentence that fits stays whole
        else:
            assert _covers(s, chunks), s
    words = text.split()
    if overlap == 0:
        assert " ".join(chunks).split() == words  # nothing repeated, nothing lost
    else:
        # Every chunk starts where the words continue, repeating at most `overlap` tokens.
        at = 0
        for k, c in enumerate(chunks):
            cw = c.split()
            start = words.index(cw[0])
            assert words[start : start + len(cw)] == cw
            if k == 0:
                assert start == 0
            else:
                assert start <= at, "gap between chunks"
                assert count(" ".join(words[start:at])) <= overlap
            at = max(at, start + len(cw))
        assert at == len(words)


# --- chunk_id ------------------------------------------------------------------------------


def test_chunk_id_is_deterministic_uuid() -> None:
    a = chunk_id("acme", "doc", 0)
    assert a == chunk_id("acme", "doc", 0)
    assert uuid.UUID(a).version == 5
    # Pinned: a change here re-ids every stored point (old chunks orphaned on re-indexing).
    assert a == "532addaa-cac5-5f21-8cef-8603dc72c304"


def test_chunk_id_differs_by_tenant_doc_and_index() -> None:
    ids = {chunk_id(t, d, i) for t in ("acme", "public") for d in ("doc", "doc2") for i in range(3)}
    assert len(ids) == 12


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("a/b", "c", 0), ("a", "b/c", 0)),
        (("a", "b#1", 0), ("a", "b", 10)),
        (("a:1", "b", 0), ("a", "1:b", 0)),
        (("", "ab", 0), ("a", "b", 0)),
    ],
)
def test_chunk_id_cannot_be_spelled_two_ways(
    one: tuple[str, str, int], other: tuple[str, str, int]
) -> None:
    assert chunk_id(*one) != chunk_id(*other)


# --- Indexer -------------------------------------------------------------------------------

MAX, OVERLAP = 8, 2
LONG = " ".join(_sentence(3, 3 * i) for i in range(8))  # 24 words: several chunks
SHORT = "Just one short sentence."


def _doc(**kw: Any) -> Document:
    base: dict[str, Any] = {
        "tenant": "acme",
        "doc_id": "guide",
        "text": LONG,
        "source": "guide.md",
        "version": 1,
    }
    base.update(kw)
    return Document(**base)


def _pieces(text: str) -> list[str]:
    return chunk_by_tokens(text, count_words, MAX, OVERLAP)


@pytest.fixture
def indexer(embedder: Any, store: Any) -> Indexer:
    store.ensure_collection(embedder.dim)
    return Indexer(embedder, store, count_words, MAX, OVERLAP)


def _receipts(out: list[Any]) -> list[DocumentIndexed]:
    assert all(e.topic is DOCUMENTS_INDEXED for e in out)
    for e in out:
        assert isinstance(e.message, DocumentIndexed)
        assert e.key == f"{e.message.tenant}/{e.message.doc_id}"
    return [e.message for e in out]


def _snapshot(store: Any) -> dict[str, Any]:
    return dict(store.points)


def test_upsert_writes_versioned_chunks(indexer: Indexer, embedder: Any, store: Any) -> None:
    (receipt,) = _receipts(indexer.process_batch([_doc(version=4)]))
    pieces = _pieces(LONG)
    assert len(pieces) > 2
    assert receipt == DocumentIndexed(
        tenant="acme", doc_id="guide", version=4, op="upsert", chunks=len(pieces)
    )
    assert len(store.points) == len(pieces)
    for i, piece in enumerate(pieces):
        point = store.points[chunk_id("acme", "guide", i)]
        assert (point.tenant, point.doc_id, point.source, point.text, point.version) == (
            "acme",
            "guide",
            "guide.md",
            piece,
            4,
        )
        assert point.vector == embedder.vector(piece)
        assert count_words(point.text) <= MAX
    assert store.doc_version("acme", "guide") == 4


def test_reupsert_same_version_is_idempotent(indexer: Indexer, store: Any) -> None:
    first = _receipts(indexer.process_batch([_doc()]))
    before = _snapshot(store)
    second = _receipts(indexer.process_batch([_doc()]))  # a redelivered record
    assert store.points == before
    assert set(store.points) == {chunk_id("acme", "guide", i) for i in range(len(before))}
    assert first == second
    assert second[0].op == "upsert" and second[0].chunks == len(before)


def test_update_with_fewer_chunks_leaves_no_old_chunk(indexer: Indexer, store: Any) -> None:
    indexer.process_batch([_doc(version=1)])
    assert len(store.doc_chunks("acme", "guide")) > 1
    (receipt,) = _receipts(indexer.process_batch([_doc(version=2, text=SHORT)]))
    assert (receipt.op, receipt.chunks, receipt.version) == ("upsert", 1, 2)
    chunks = store.doc_chunks("acme", "guide")
    assert [(c.point_id, c.text, c.version) for c in chunks] == [
        (chunk_id("acme", "guide", 0), SHORT, 2)
    ]
    assert len(store.points) == 1
    assert store.doc_version("acme", "guide") == 2


def test_delete_removes_only_that_document(indexer: Indexer, store: Any) -> None:
    indexer.process_batch(
        [
            _doc(),
            _doc(doc_id="other", text=SHORT),
            _doc(tenant="globex"),  # same doc id, other tenant
        ]
    )
    untouched = {
        pid: c for pid, c in store.points.items() if (c.tenant, c.doc_id) != ("acme", "guide")
    }
    assert untouched and len(untouched) < len(store.points)
    (receipt,) = _receipts(indexer.process_batch([_doc(op="delete", text="", version=1)]))
    assert receipt == DocumentIndexed(
        tenant="acme", doc_id="guide", version=1, op="delete", chunks=0
    )
    assert store.points == untouched
    assert store.doc_version("acme", "guide") == 1  # the deleted version is remembered
    assert store.doc_version("globex", "guide") == 1


def test_delete_of_an_unknown_document_is_a_noop(indexer: Indexer, store: Any) -> None:
    indexer.process_batch([_doc(doc_id="keep", text=SHORT)])
    before = _snapshot(store)
    (receipt,) = _receipts(indexer.process_batch([_doc(op="delete", text="")]))
    assert receipt.op == "delete"
    assert store.points == before


@pytest.mark.parametrize("op", ["upsert", "delete"])
def test_older_version_is_skipped(indexer: Indexer, embedder: Any, store: Any, op: str) -> None:
    indexer.process_batch([_doc(version=5)])
    before = _snapshot(store)
    embedder.calls.clear()
    (receipt,) = _receipts(indexer.process_batch([_doc(version=3, op=op, text=SHORT)]))
    assert (receipt.op, receipt.version, receipt.chunks) == ("skipped", 3, 0)
    assert receipt.reason and "5" in receipt.reason
    assert store.points == before
    assert SHORT not in [t for call in embedder.calls for t in call]


def test_stale_upsert_after_delete_does_not_resurrect(indexer: Indexer, store: Any) -> None:
    indexer.process_batch([_doc(version=1)])
    indexer.process_batch([_doc(version=2, op="delete", text="")])
    (receipt,) = _receipts(indexer.process_batch([_doc(version=1)]))
    assert receipt.op == "skipped"
    assert store.points == {}


def test_same_document_twice_in_a_batch_only_the_last_applies(
    indexer: Indexer, embedder: Any, store: Any
) -> None:
    out = _receipts(indexer.process_batch([_doc(version=1), _doc(version=2, text=SHORT)]))
    assert [(r.op, r.version, r.chunks) for r in out] == [("upsert", 2, 1)]
    assert [c.text for c in store.doc_chunks("acme", "guide")] == [SHORT]
    assert embedder.calls == [[SHORT]]  # the superseded text is not even embedded


def test_upsert_then_delete_in_one_batch_leaves_nothing(
    indexer: Indexer, embedder: Any, store: Any
) -> None:
    out = _receipts(indexer.process_batch([_doc(), _doc(op="delete", text="")]))
    assert [r.op for r in out] == ["delete"]
    assert store.points == {}
    assert [t for call in embedder.calls for t in call] == []


def test_one_embed_call_per_batch(indexer: Indexer, embedder: Any, store: Any) -> None:
    indexer.process_batch([_doc(doc_id="gone", text=SHORT)])
    embedder.calls.clear()
    docs = [
        _doc(doc_id="a"),
        _doc(doc_id="gone", op="delete", text=""),
        _doc(tenant="globex", doc_id="b", text=SHORT),
        _doc(doc_id="c", text="Another doc. With two sentences."),
    ]
    out = _receipts(indexer.process_batch(docs))
    upserts = [d for d in docs if d.op == "upsert"]
    assert len(embedder.calls) == 1
    assert embedder.calls[0] == [p for d in upserts for p in _pieces(d.text)]
    assert sorted((r.doc_id, r.op, r.chunks) for r in out) == sorted(
        [(d.doc_id, "upsert", len(_pieces(d.text))) for d in upserts] + [("gone", "delete", 0)]
    )
    for d in upserts:
        stored = store.doc_chunks(d.tenant, d.doc_id)
        assert [c.text for c in stored] == _pieces(d.text)
        assert all(c.vector == embedder.vector(c.text) for c in stored)


def test_a_changed_document_drops_the_cached_answers_it_may_have_sourced(
    embedder: Any, store: Any
) -> None:
    cache = ResponseCache()
    for rid, tenant in (("a", "acme"), ("b", "other")):
        cache.expect(req(request_id=rid, tenant=tenant), E1, NOW)
        assert cache.learn_one(resp(request_id=rid, tenant=tenant), NOW)
    store.ensure_collection(embedder.dim)
    indexer = Indexer(embedder, store, count_words, MAX, OVERLAP, cache=cache)
    indexer.process_batch([Document(tenant="acme", doc_id="d", text="New facts.")])
    assert len(cache) == 1  # acme's answer is gone, other's stays
    stale = Document(tenant="other", doc_id="d2", text="Old.", version=0)
    indexer.process_batch([Document(tenant="other", doc_id="d2", text="New.", version=5)])
    assert len(cache) == 0
    indexer.process_batch([stale])  # skipped (older): changes nothing
