"""Is an answer supported by its passages? Sentence by sentence, without a second model.

No NLI or cross-encoder model installs offline (see DESIGN.md), so support is judged
with what the pipeline already has, the MiniLM embedder, and lexical evidence:

- **Specifics.** A sentence naming something the passages never mention (a number, an
  identifier such as ``llm.requests`` or ``KLLM_TOP_K``, a CamelCase or upper-case name,
  a capitalised word inside the sentence) is unsupported, whatever else it says: that is
  how the small model invents module and model names.
- **Overlap.** Otherwise, the share of the sentence's content words (no stop words) found
  in one passage. At or above ``min_overlap`` the sentence is supported.
- **Similarity.** Otherwise, the best cosine between the sentence and a sentence of a
  passage (both embedded). At or above ``min_cosine`` the sentence is supported.

The thresholds are hyperparameters; `kllm eval calibrate` measures them against the
labelled sentences of eval/support_labels.jsonl. A sentence that only declines ("the
context does not say") makes no claim and is left out of the count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from processors.retrieval import Embedder

__all__ = [
    "DECLINE",
    "Calibration",
    "Evidence",
    "GroundingScorer",
    "Labelled",
    "SentenceSupport",
    "Support",
    "calibrate",
    "cited",
    "content_words",
    "cosine_of",
    "declines",
    "measure",
    "sentences",
    "specifics",
]

# A sentence ends at . ! or ? followed by space and a capital, digit, bracket or quote:
# identifiers such as "faq.md" or "e.g. the" do not end one (no model needed for this).
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d]))\s+(?=[A-Z0-9\[(\"'`*-])|\n\s*\n|\n\s*(?=[-*\d]+[.)]?\s)"
)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# Citations after a sentence's full stop ("a fact. [1]", or a quote's: '"a fact." [1]')
# belong to that sentence.
_TRAILING_CITATIONS = re.compile(r"([.!?][\"'\u201d]?)[ \t]*((?:\[\d+(?:\s*,\s*\d+)*\][ \t]*)+)")
_WORD = re.compile(r"[A-Za-z0-9_]+(?:[./-][A-Za-z0-9_]+)*")
_STOP = frozenset(ENGLISH_STOP_WORDS)
_NOT = r"(?:n['\u2019]t|\s+not)"
DECLINE = re.compile(
    r"\b(?:(?:the\s+)?(?:given\s+|provided\s+)?(?:context|passages?|documents?|text|sources?)"
    rf"(?:\s+provided)?\s+(?:does|do|did){_NOT}\s+(?:contain|mention|say|provide|include|"
    r"specify|state|cover|answer|have)|not\s+(?:in|mentioned\s+in|covered\s+(?:by|in)|"
    r"provided\s+in|found\s+in|stated\s+in|given\s+in)\s+the\s+(?:context|passages?|"
    r"documents?|text)|no\s+(?:information|mention|details?)\s+(?:about|on|of|regarding|"
    r"in|is)|(?:i|we)\s+(?:cannot|can['\u2019]t|am\s+unable\s+to|(?:do|does)"
    rf"{_NOT})\s+(?:answer|find|determine|tell|know))\b",
    re.IGNORECASE,
)
"""A sentence that declines to answer: the template asks the model to say so."""


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones left out."""
    text = _TRAILING_CITATIONS.sub(lambda m: f" {m[2].strip()}{m[1]} ", text.strip())
    parts = _SENTENCE_END.split(text.strip())
    return [p.strip(" \t\n-*") for p in parts if p.strip(" \t\n-*")]


def cited(sentence: str) -> list[int]:
    """The passage numbers a sentence cites, ``[1]`` or ``[1, 3]``, in order."""
    return [int(n) for group in _CITATION.findall(sentence) for n in group.split(",")]


def declines(text: str) -> bool:
    """Whether the answer declines: its first sentence, or a one-sentence answer, says
    the context does not hold the answer."""
    said = sentences(text)
    return bool(said) and DECLINE.search(said[0]) is not None


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(_CITATION.sub(" ", text))]


def content_words(text: str) -> set[str]:
    """The lower-cased words of ``text`` that carry content (no stop words, no citations)."""
    return {w for w in _words(text) if w not in _STOP and len(w) > 1}


def specifics(sentence: str) -> set[str]:
    """Names and numbers in a sentence: what an invented claim usually gets wrong."""
    found = set()
    for i, match in enumerate(_WORD.finditer(_CITATION.sub(" ", sentence))):
        w = match.group()
        if (
            any(c.isdigit() for c in w)
            or any(c in w for c in "._/")
            or (len(w) > 1 and w.isupper())
            or re.search(r"[a-z][A-Z]", w)
            or (i > 0 and w[0].isupper() and w.lower() not in _STOP)
        ):
            found.add(w.lower())
    return found


@dataclass(frozen=True)
class SentenceSupport:
    """How one answer sentence stands against the passages."""

    sentence: str
    supported: bool
    overlap: float
    """The best share of its content words found in one passage."""
    cosine: float
    """The best cosine to a sentence of a passage."""
    unknown: tuple[str, ...]
    """Its names and numbers that no passage mentions."""
    passage: int | None
    """The 1-based passage that supports it best."""


@dataclass(frozen=True)
class Support:
    """An answer's support: per sentence, and the share of its claims supported."""

    sentences: tuple[SentenceSupport, ...]

    @property
    def groundedness(self) -> float | None:
        """Supported share of the claim sentences; None when there are none."""
        if not self.sentences:
            return None
        return sum(s.supported for s in self.sentences) / len(self.sentences)


@dataclass(frozen=True)
class Evidence:
    """What the passages offer one sentence, before any threshold."""

    overlap: float
    overlap_passage: int | None
    cosine: float
    cosine_passage: int | None
    unknown: tuple[str, ...]


class GroundingScorer:
    """Scores answer sentences against passages (see the module docstring).

    Hyperparameters: ``min_overlap`` and ``min_cosine`` (measured on labelled sentences,
    see `kllm eval calibrate`). Without an embedder only the lexical arms judge (every
    cosine is 0): stricter, and free of a model. The scorer learns nothing: every query
    is pure."""

    def __init__(
        self, embedder: Embedder | None, min_overlap: float = 0.55, min_cosine: float = 0.725
    ):
        self.embedder = embedder
        self.min_overlap = min_overlap
        self.min_cosine = min_cosine

    def support(self, answer: str, passages: Sequence[str]) -> Support:
        """Each claim sentence of ``answer`` against ``passages``."""
        claims = [s for s in sentences(answer) if DECLINE.search(s) is None and content_words(s)]
        return Support(tuple(self.sentence_support(claims, passages)))

    def sentence_support(
        self, claims: Sequence[str], passages: Sequence[str]
    ) -> list[SentenceSupport]:
        """Each of ``claims`` against ``passages`` (one embedding call for all)."""
        return [
            self.judge(claim, e)
            for claim, e in zip(claims, self.evidence(claims, passages), strict=True)
        ]

    def judge(self, claim: str, e: Evidence) -> SentenceSupport:
        """The thresholds applied to one sentence's evidence."""
        by_overlap = e.overlap >= self.min_overlap
        supported = not e.unknown and (by_overlap or e.cosine >= self.min_cosine)
        passage = e.overlap_passage if by_overlap or not supported else e.cosine_passage
        return SentenceSupport(claim, supported, e.overlap, e.cosine, e.unknown, passage)

    def evidence(
        self,
        claims: Sequence[str],
        passages: Sequence[str],
        vectors: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> list[Evidence]:
        """Overlap, similarity and unknown names of each claim against ``passages``.
        ``vectors`` (text -> unit vector) saves embedding texts already embedded."""
        known = set().union(*(_words(p) for p in passages)) if passages else set()
        contents = [content_words(p) for p in passages]
        pieces = [(i, s) for i, p in enumerate(passages) for s in sentences(p)]
        cosines = np.zeros((len(claims), 0), dtype=np.float32)
        if claims and pieces and (vectors is not None or self.embedder is not None):
            texts = [*claims, *(s for _, s in pieces)]
            have = vectors if vectors is not None else self.vectors(texts)
            matrix = np.stack([have[t] for t in texts])
            cosines = matrix[: len(claims)] @ matrix[len(claims) :].T
        out = []
        for row, claim in enumerate(claims):
            words = content_words(claim)
            shares = [len(words & c) / len(words) if words else 0.0 for c in contents]
            best = max(range(len(shares)), key=shares.__getitem__) if shares else None
            at = int(np.argmax(cosines[row])) if cosines.shape[1] else None
            out.append(
                Evidence(
                    overlap=shares[best] if best is not None else 0.0,
                    overlap_passage=_one(best),
                    cosine=float(cosines[row, at]) if at is not None else 0.0,
                    cosine_passage=None if at is None else pieces[at][0] + 1,
                    unknown=tuple(sorted(specifics(claim) - known)),
                )
            )
        return out

    def vectors(self, texts: Iterable[str]) -> dict[str, npt.NDArray[np.float32]]:
        """Unit vectors of the distinct ``texts``, in one embedding call."""
        distinct = list(dict.fromkeys(texts))
        if self.embedder is None:
            raise ValueError("this scorer has no embedder: it judges by words alone")
        return dict(zip(distinct, _unit(self.embedder.embed(distinct)), strict=True))

    def citation_validity(self, answer: str, passages: Sequence[str]) -> float | None:
        """Of the answer's citations ``[n]``, the share naming a passage that supports its
        sentence (a number past the passages counts as invalid); None: no citations."""
        checks = [(s, n) for s in sentences(answer) for n in cited(s)]
        if not checks:
            return None
        named = [(s, passages[n - 1]) for s, n in checks if 1 <= n <= len(passages)]
        evidence = self.evidence_each(named)  # one embedding call for all
        valid = sum(self.judge(s, e).supported for (s, _), e in zip(named, evidence, strict=True))
        return valid / len(checks)

    def evidence_each(self, pairs: Sequence[tuple[str, str]]) -> list[Evidence]:
        """The evidence of each (sentence, passage) pair, all embedded in one call."""
        texts = [t for sentence, passage in pairs for t in (sentence, *sentences(passage))]
        vectors = self.vectors(texts) if texts and self.embedder is not None else None
        return [self.evidence([s], [p], vectors)[0] for s, p in pairs]


@dataclass(frozen=True)
class Labelled:
    """A sentence, a passage, and whether a careful reader finds it supported."""

    sentence: str
    passage: str
    supported: bool


@dataclass(frozen=True)
class Calibration:
    """How well a pair of thresholds finds the unsupported sentences of a labelled set."""

    min_overlap: float
    min_cosine: float
    precision: float
    """Of the sentences called unsupported, the share that are."""
    recall: float
    """Of the unsupported sentences, the share called so."""
    examples: int

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


OVERLAP_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(15))  # 0.30 .. 1.00
COSINE_GRID = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))  # 0.500 .. 1.000


def calibrate(
    scorer: GroundingScorer,
    labelled: Sequence[Labelled],
    overlaps: Sequence[float] = OVERLAP_GRID,
    cosines: Sequence[float] = COSINE_GRID,
    evidence: Sequence[Evidence] | None = None,
) -> list[Calibration]:
    """Every pair of thresholds on the grids against ``labelled``, best F1 first (ties:
    higher precision). The evidence is computed once (or given); ``scorer`` is not changed."""
    if evidence is None:
        evidence = scorer.evidence_each([(x.sentence, x.passage) for x in labelled])
    results = [
        measure(GroundingScorer(scorer.embedder, o, c), labelled, evidence)
        for o in overlaps
        for c in cosines
    ]
    return sorted(results, key=lambda r: (-r.f1, -r.precision, r.min_overlap, r.min_cosine))


def measure(
    scorer: GroundingScorer,
    labelled: Sequence[Labelled],
    evidence: Sequence[Evidence] | None = None,
) -> Calibration:
    """Precision and recall of "unsupported" with ``scorer``'s thresholds."""
    if evidence is None:
        evidence = scorer.evidence_each([(x.sentence, x.passage) for x in labelled])
    said = [
        not scorer.judge(x.sentence, e).supported for x, e in zip(labelled, evidence, strict=True)
    ]
    truth = [not x.supported for x in labelled]
    hits = sum(s and t for s, t in zip(said, truth, strict=True))
    return Calibration(
        scorer.min_overlap,
        scorer.min_cosine,
        precision=hits / sum(said) if any(said) else 1.0,
        recall=hits / sum(truth) if any(truth) else 1.0,
        examples=len(labelled),
    )


def cosine_of(embedder: Embedder, a: str, b: str) -> float:
    """The cosine between two texts' embeddings (0 when either is all zeros)."""
    va, vb = (np.asarray(v, dtype=np.float64) for v in embedder.embed([a, b]))
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb / norm) if norm else 0.0


def _one(index: int | None) -> int | None:
    return None if index is None else index + 1


def _unit(vectors: list[list[float]]) -> npt.NDArray[np.float32]:
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.where(norms == 0, 1.0, norms)).astype(np.float32)
