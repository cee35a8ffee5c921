"""Grounded answers: decline what the passages cannot answer, quote what the model got wrong.

The small default model answers from outside its context more often than not (see the
README's golden-set table), so the moderation stage puts every whole answer through
``GroundedAnswerer`` before its checks:

1. **Does the context answer the question?** It does not when no passage was retrieved,
   when the best passage scores under ``min_score``, when the question names something
   (a number, an identifier, a proper name) that no passage mentions, or when under
   ``min_coverage`` of the question's content words appear in the passages. Then the
   answer is ``DECLINED_TEXT``: mode ``declined``.
2. **Is the generated answer supported?** Sentence by sentence, with the lexical arms
   of `processors.grounding` (names and numbers, content-word overlap; no embedder in
   this stage). At or above ``min_groundedness`` it stands: mode ``generated``.
3. **Otherwise** the answer is the ``quote_sentences`` passage sentences that share the
   most words with the question, quoted, each cited by its passage number: mode
   ``quoted``.

The thresholds were chosen offline, on the passages retrieval finds for the golden
set's questions (eval/golden.jsonl), without the model, and checked on each half of it;
the README gives the figures. All queries are pure: the answerer learns nothing.

The generated answer's support is judged by words alone here (no embedder in this
stage): stricter than the evaluation stage's calibrated scorer, which also uses cosine
similarity, so the two groundedness figures of one answer can differ.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from processors.grounding import GroundingScorer, content_words, sentences, specifics

__all__ = ["DECLINED_TEXT", "AnswerMode", "Grounded", "GroundedAnswerer", "Policy"]

AnswerMode = Literal["generated", "quoted", "declined"]
Policy = Literal["grounded", "flag", "off"]
"""``grounded`` replaces unsupported answers; ``flag`` only scores them; ``off`` skips."""
DECLINED_TEXT = "The provided documents do not answer this question."
# The project's own name is in nearly every question and most passages: no evidence.
_GENERIC = frozenset({"kllm"})
# A Markdown heading that chunking joined to the sentence before or after it: not quoted.
_HEADING = re.compile(r"^#{1,6}\s+[^\n]*?[?:]\s+|^#{1,6}\s+[^\n]*$|\s+#{1,6}\s+.*$")


def _stem(word: str) -> str:
    """A light plural and tense stem, so "stages" meets "stage" and "started" "start"
    (no stemmer library needed for this)."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in content_words(text)} - _GENERIC


@dataclass(frozen=True)
class Grounded:
    """The answer to give, how it was reached, and the generated answer's support."""

    text: str
    mode: AnswerMode
    groundedness: float | None
    """The supported share of the generated answer's claims; None when not scored."""
    reason: str = ""
    """Why the generated answer was not given (no prompt text)."""


class GroundedAnswerer:
    """Chooses between the generated answer, quoted passages and declining.

    Hyperparameters: ``min_score`` (the best passage's retrieval score), ``min_coverage``
    (share of the question's content words in the passages), ``min_groundedness`` (of
    the generated answer) and ``quote_sentences``."""

    def __init__(
        self,
        scorer: GroundingScorer | None = None,
        *,
        min_score: float = 0.3,
        min_coverage: float = 0.3,
        min_groundedness: float = 0.5,
        quote_sentences: int = 3,
    ) -> None:
        if quote_sentences < 1:
            raise ValueError(f"quote_sentences must be at least 1, got {quote_sentences}")
        self.scorer = scorer if scorer is not None else GroundingScorer(None)
        self.min_score = min_score
        self.min_coverage = min_coverage
        self.min_groundedness = min_groundedness
        self.quote_sentences = quote_sentences

    def unanswered(self, question: str, passages: Sequence[str], scores: Sequence[float]) -> str:
        """Why the passages do not answer ``question``; empty when they may."""
        if not passages:
            return "no passage was retrieved"
        if max(scores, default=0.0) < self.min_score:
            return f"the best passage scores under {self.min_score:g}"
        text = " ".join(passages).lower()
        # Names per sentence: a capitalised first word of a later sentence is no name.
        named = set().union(*(specifics(s) for s in sentences(question))) - _GENERIC
        missing = sorted(w for w in named if w not in text)
        if missing:
            return f"{len(missing)} name(s) or number(s) of the question are in no passage"
        asked = _stems(question)
        found = _stems(text)
        if asked and len(asked & found) / len(asked) < self.min_coverage:
            return f"under {self.min_coverage:g} of the question's words are in the passages"
        return ""

    def quotes(self, question: str, passages: Sequence[str]) -> list[tuple[str, int]]:
        """The passage sentences (with their 1-based passage) sharing the most words with
        ``question``, in passage order; an earlier passage wins a tie."""
        asked = _stems(question)
        found = [
            (p, text)
            for p, passage in enumerate(passages)
            for s in sentences(passage)
            if (text := _HEADING.sub("", s).strip())
        ]
        ranked = sorted(
            (
                (len(asked & _stems(s)) / max(1, len(asked)) - 0.05 * p, order, s, p + 1)
                for order, (p, s) in enumerate(found)
            ),
            key=lambda r: (-r[0], r[1]),
        )[: self.quote_sentences]
        return [(s, n) for _, _, s, n in sorted(ranked, key=lambda r: r[1])]

    def answer(
        self,
        question: str,
        search: str,
        generated: str,
        passages: Sequence[str],
        scores: Sequence[float],
        *,
        replace: bool = True,
    ) -> Grounded:
        """What to answer ``question`` with. ``search`` is the question as retrieval
        searched it (a follow-up with the turn it follows). With ``replace`` false the
        generated answer stands and is only scored."""
        why = self.unanswered(question, passages, scores)
        support = self.scorer.support(generated, passages) if passages else None
        grounded = support.groundedness if support is not None else None
        if not replace:
            return Grounded(generated, "generated", grounded, why)
        if why:
            return Grounded(DECLINED_TEXT, "declined", grounded, why)
        if grounded is None or grounded >= self.min_groundedness:
            return Grounded(generated, "generated", grounded)
        quoted = self.quotes(search, passages)
        text = "\n".join(f'"{s}" [{n}]' for s, n in quoted)
        reason = f"the generated answer's groundedness is under {self.min_groundedness:g}"
        return Grounded(text, "quoted", grounded, reason)
