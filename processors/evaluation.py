"""Golden-set evaluation: the cases, each case's scores, the aggregates, and a paired
comparison of two runs with bootstrap confidence intervals.

A case (eval/golden.jsonl) is a question or a conversation, a reference answer, and the
ids of the documents that hold the answer (none: the corpus cannot answer it, and the
pipeline should decline). What the pipeline gave for it (``Observed``) is scored:

- context recall: a reference document was retrieved, and at which rank (MRR too);
- groundedness: the share of the answer's claim sentences its passages support
  (processors.grounding); an answer under half supported counts as unsupported;
- citation validity: each ``[n]`` names a passage that exists and supports the sentence;
- answer similarity: embedding cosine and ROUGE-L F1 against the reference;
- fact stated: at least half of the reference's content words are in the answer;
- refusals: unanswerable cases declined, answerable ones declined by mistake;
- latency, tokens and cost, as the response reports them.

Every metric is the mean (latency: the median) of one value per case, over the cases it
applies to, so two runs compare case by case (``compare``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rouge_score.rouge_scorer import RougeScorer
from scipy.stats import bootstrap

from kllm.core.errors import PipelineError
from processors.grounding import GroundingScorer, content_words, cosine_of, declines
from processors.retrieval import Embedder

__all__ = [
    "METRICS",
    "CaseFileError",
    "CaseScore",
    "CaseScorer",
    "Delta",
    "GoldenCase",
    "Metric",
    "Observed",
    "aggregate",
    "compare",
    "load_cases",
]

UNSUPPORTED_BELOW = 0.5
"""An answer whose groundedness is under this is an unsupported answer."""
FACT_STATED_AT = 0.5
"""The share of the reference's content words an answer must contain to state its fact."""


class CaseFileError(PipelineError):
    """A golden-set file is malformed; the message names every bad line."""


class GoldenTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class GoldenCase(BaseModel):
    """One line of a golden set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=64)
    kind: Literal["answerable", "unanswerable", "multi-turn"]
    messages: list[GoldenTurn] = Field(min_length=1, max_length=32)
    reference: str
    doc_ids: list[str] = Field(default_factory=list)
    tenant: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GoldenCase:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's question")
        if (self.kind == "unanswerable") != (not self.doc_ids):
            raise ValueError("doc_ids must be empty exactly when the case is unanswerable")
        return self

    @property
    def answerable(self) -> bool:
        return bool(self.doc_ids)


def load_cases(lines: Iterable[str]) -> list[GoldenCase]:
    """Parse a golden set (JSON lines; blank lines skipped); every bad line is named."""
    cases: list[GoldenCase] = []
    bad: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            case = GoldenCase.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            bad.append(f"line {number}: {where}: {first['msg']}")
            continue
        if case.id in seen:
            bad.append(f"line {number}: id {case.id!r} used twice")
        seen.add(case.id)
        cases.append(case)
    if bad:
        raise CaseFileError(
            "; ".join(bad[:20]) + (f" (and {len(bad) - 20} more)" * (len(bad) > 20))
        )
    if not cases:
        raise CaseFileError("no cases")
    return cases


@dataclass(frozen=True)
class Observed:
    """What the pipeline gave for one case."""

    answer: str
    retrieved: list[str]
    """Document ids of the passages retrieved, best first."""
    passages: list[str] | None
    """The passage texts the model saw, numbered from 1 as in its prompt (none: nothing
    was retrieved, and every claim is unsupported); None when unknown (an answer from
    the cache, or a generation not read in time): then support is not scored."""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    cached: bool = False
    answer_mode: str = "generated"
    """How moderation reached the answer: generated, quoted or declined."""


@dataclass(frozen=True)
class CaseScore:
    """A case's scores; None where a score does not apply."""

    id: str
    kind: str
    answerable: bool
    answered: bool
    declined: bool
    context_rank: int | None
    groundedness: float | None
    citation_validity: float | None
    answer_cosine: float | None
    rouge_l: float | None
    fact_recall: float | None
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached: bool = False
    error: str | None = None
    answer_mode: str = "generated"
    unsupported: list[str] = field(default_factory=list)
    """The answer's sentences no passage supports (for reading, not scoring)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CaseScore:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class CaseScorer:
    """Scores one case at a time (pure: it learns nothing)."""

    def __init__(self, embedder: Embedder, grounding: GroundingScorer) -> None:
        self.embedder = embedder
        self.grounding = grounding
        self.rouge = RougeScorer(["rougeL"], use_stemmer=True)

    def score(self, case: GoldenCase, seen: Observed) -> CaseScore:
        answered = seen.error is None
        declined = answered and declines(seen.answer)
        rank = next((i + 1 for i, doc in enumerate(seen.retrieved) if doc in case.doc_ids), None)
        grounded = citations = cosine = rouge = recall = None
        unsupported: list[str] = []
        if answered and case.answerable:
            cosine = cosine_of(self.embedder, seen.answer, case.reference)
            rouge = float(self.rouge.score(case.reference, seen.answer)["rougeL"].fmeasure)
            recall = _fact_recall(case.reference, seen.answer)
            if not declined and seen.passages is not None:
                support = self.grounding.support(seen.answer, seen.passages)
                grounded = support.groundedness
                unsupported = [s.sentence for s in support.sentences if not s.supported]
                citations = self.grounding.citation_validity(seen.answer, seen.passages)
        return CaseScore(
            id=case.id,
            kind=case.kind,
            answerable=case.answerable,
            answered=answered,
            declined=declined,
            context_rank=rank if case.answerable else None,
            groundedness=grounded,
            citation_validity=citations,
            answer_cosine=cosine,
            rouge_l=rouge,
            fact_recall=recall,
            latency_ms=seen.latency_ms,
            prompt_tokens=seen.prompt_tokens,
            completion_tokens=seen.completion_tokens,
            cost_usd=seen.cost_usd,
            cached=seen.cached,
            error=seen.error,
            answer_mode=seen.answer_mode,
            unsupported=unsupported,
        )


def _fact_recall(reference: str, answer: str) -> float | None:
    words = content_words(reference)
    return len(words & content_words(answer)) / len(words) if words else None


# -- metrics -----------------------------------------------------------------------------

Applies = Literal["all", "answerable", "unanswerable", "grounded"]


@dataclass(frozen=True)
class Metric:
    """One metric: its per-case value, the cases it applies to, and how to sum it up."""

    name: str
    what: str
    value: Callable[[CaseScore], float | None]
    higher_is_better: bool
    applies: Applies = "all"
    median: bool = False
    gate: bool = True
    """Whether `kllm eval compare` fails the run when it gets worse (not for latency,
    tokens and cost: this machine is shared and noisy)."""

    def values(self, scores: Iterable[CaseScore]) -> dict[str, float]:
        """Case id -> value, for the cases the metric applies to and has a value for."""
        out: dict[str, float] = {}
        for s in scores:
            if not _applies(self.applies, s):
                continue
            v = self.value(s)
            if v is not None:
                out[s.id] = float(v)
        return out

    def summary(self, values: Sequence[float]) -> float | None:
        if not values:
            return None
        return float(np.median(values) if self.median else np.mean(values))


def _applies(applies: Applies, s: CaseScore) -> bool:
    if applies == "answerable":
        return s.answerable and s.answered
    if applies == "unanswerable":
        return not s.answerable and s.answered
    if applies == "grounded":  # an answer that makes claims, with its passages known
        return s.answerable and s.answered and not s.declined
    return True


def _flag(condition: bool | None) -> float | None:
    return None if condition is None else float(condition)


METRICS: tuple[Metric, ...] = (
    Metric("context_recall", "a reference document retrieved",
           lambda s: _flag(s.context_rank is not None), True, "answerable"),
    Metric("mrr", "1 / rank of the first reference document (0: none)",
           lambda s: 1 / s.context_rank if s.context_rank else 0.0, True, "answerable"),
    Metric("groundedness", "share of claim sentences the passages support",
           lambda s: s.groundedness, True, "grounded"),
    Metric("unsupported_rate", f"answers under {UNSUPPORTED_BELOW:g} grounded",
           lambda s: _flag(None if s.groundedness is None else s.groundedness < UNSUPPORTED_BELOW),
           False, "grounded"),
    Metric("citation_validity", "citations naming a passage that supports the sentence",
           lambda s: s.citation_validity, True, "grounded"),
    Metric("answer_cosine", "embedding cosine to the reference",
           lambda s: s.answer_cosine, True, "answerable"),
    Metric("rouge_l", "ROUGE-L F1 against the reference",
           lambda s: s.rouge_l, True, "answerable"),
    Metric("fact_stated", f"at least {FACT_STATED_AT:g} of the reference's content words said",
           lambda s: _flag(None if s.fact_recall is None else s.fact_recall >= FACT_STATED_AT),
           True, "answerable"),
    Metric("refusal_accuracy", "unanswerable cases declined",
           lambda s: float(s.declined), True, "unanswerable"),
    Metric("false_refusal_rate", "answerable cases declined",
           lambda s: float(s.declined), False, "answerable"),
    Metric("error_rate", "cases answered with an error",
           lambda s: float(not s.answered), False),
    Metric("latency_ms", "end-to-end milliseconds (median)",
           lambda s: s.latency_ms if s.answered else None, False, median=True, gate=False),
    Metric("completion_tokens", "generated tokens per answer",
           lambda s: float(s.completion_tokens) if s.answered else None, False, gate=False),
    Metric("cost_usd", "cost per answer, as the engine pool prices it",
           lambda s: s.cost_usd if s.answered else None, False, gate=False),
)  # fmt: skip


def aggregate(scores: Sequence[CaseScore]) -> dict[str, float | None]:
    """Every metric over ``scores``; None where no case applies."""
    return {m.name: m.summary(list(m.values(scores).values())) for m in METRICS}


@dataclass(frozen=True)
class Delta:
    """One metric, run A against run B on the cases both have a value for."""

    metric: Metric
    cases: int
    a: float | None
    b: float | None
    low: float | None
    high: float | None
    """The bootstrap confidence interval of ``b - a`` (None with too few cases)."""

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    def worse_by(self) -> float:
        """How much worse B is than A, in the metric's own units (0 when better)."""
        d = self.delta or 0.0
        return max(0.0, -d if self.metric.higher_is_better else d)


def compare(
    a: Sequence[CaseScore],
    b: Sequence[CaseScore],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> list[Delta]:
    """Each metric of run B against run A, paired case by case (same ids), with a
    percentile bootstrap interval of the difference."""
    out = []
    for m in METRICS:
        va, vb = m.values(a), m.values(b)
        ids = sorted(va.keys() & vb.keys())
        xs = np.array([va[i] for i in ids])
        ys = np.array([vb[i] for i in ids])
        low = high = None
        if len(ids) >= 3 and (xs != ys).any():

            def diff(x: np.ndarray, y: np.ndarray, _m: Metric = m) -> float:
                return float((_m.summary(list(y)) or 0.0) - (_m.summary(list(x)) or 0.0))

            res = bootstrap(
                (xs, ys), diff, paired=True, vectorized=False, n_resamples=resamples,
                confidence_level=confidence, method="percentile", random_state=seed,
            )  # fmt: skip
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        elif len(ids) >= 1:
            low = high = 0.0 if (xs == ys).all() else None
        out.append(Delta(m, len(ids), m.summary(list(xs)), m.summary(list(ys)), low, high))
    return out
