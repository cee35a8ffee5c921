"""Online evaluation: a sample of the live answers scored as the golden set scores them.

The evaluation stage reads ``llm.generations`` (each answer with the passages its model
saw) in its own consumer group, and publishes one ``Evaluation`` per sampled answer to
``llm.evaluations``:

- **groundedness**: the supported share of the answer's claim sentences, judged by
  `processors.grounding` with the embedder (the calibrated thresholds); under
  ``min_groundedness`` the answer counts as unsupported;
- **citation validity**: the cited passage numbers exist and support their sentence;
- **relevance**: the cosine between the question and the answer.

What is scored is the model's own answer, before moderation's grounded policy may
replace it: that is the model's quality, which drift detection and model comparison
are about. Sampling is per tenant (``sample`` and ``per_tenant``) and fixed by the
request id, so a replayed record is sampled again, and any replica agrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from processors.base import Emit
from processors.conversation import latest_question
from processors.evaluation import UNSUPPORTED_BELOW
from processors.grounding import GroundingScorer, cosine_of, declines
from processors.retrieval import Embedder
from processors.templates import bucket
from schemas import Evaluation, Generation
from topics import EVALUATIONS

__all__ = ["UNSUPPORTED_BELOW", "OnlineEvaluator"]


class OnlineEvaluator:
    """Scores a sample of generations. Hyperparameters: ``sample`` (the share of each
    tenant's answers scored), ``per_tenant`` (tenant -> its own share) and
    ``min_groundedness``; ``source`` marks what it scores (live or shadow answers).
    Pure: it learns nothing."""

    def __init__(
        self,
        embedder: Embedder,
        scorer: GroundingScorer | None = None,
        *,
        sample: float = 0.1,
        per_tenant: Mapping[str, float] | None = None,
        min_groundedness: float = UNSUPPORTED_BELOW,
        source: Literal["primary", "shadow"] = "primary",
    ) -> None:
        rates = {"": sample, **(per_tenant or {})}
        bad = {t or "(default)": r for t, r in rates.items() if not 0.0 <= r <= 1.0}
        if bad:
            raise ValueError(f"sample rates must be in [0, 1], got {bad}")
        self.embedder = embedder
        self.scorer = scorer if scorer is not None else GroundingScorer(embedder)
        self.sample = sample
        self.per_tenant = dict(per_tenant or {})
        self.min_groundedness = min_groundedness
        self.source: Literal["primary", "shadow"] = source

    def sampled(self, request_id: str, tenant: str) -> bool:
        """Whether this answer is scored: a draw fixed by its request id."""
        rate = self.per_tenant.get(tenant, self.sample)
        return rate > 0 and bucket("evaluation", 1, request_id) < rate

    def process(self, generation: Generation) -> list[Emit]:
        """The generation's evaluation, if it is sampled."""
        request = generation.request
        if not self.sampled(request.request_id, request.tenant):
            return []
        evaluation = self.evaluate(generation)
        return [Emit(EVALUATIONS, request.request_id, evaluation)]

    def evaluate(self, generation: Generation) -> Evaluation:
        """The scores of one generation (sampled or not)."""
        request = generation.request
        usage = generation.usage
        base = Evaluation(
            request_id=request.request_id,
            tenant=request.tenant,
            model=generation.model,
            template=request.template,
            source=self.source,
            passages=len(generation.chunks),
            latency_ms=generation.latency_ms,
            ttft_ms=generation.ttft_ms,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=generation.cost_usd,
            error=generation.error,
        )
        if generation.error or not generation.text.strip():
            return base
        passages = [c.text for c in generation.chunks]
        declined = declines(generation.text)
        support = self.scorer.support(generation.text, passages)
        grounded = None if declined else support.groundedness
        return base.model_copy(
            update={
                "groundedness": grounded,
                "unsupported": grounded is not None and grounded < self.min_groundedness,
                "declined": declined,
                "claims": len(support.sentences),
                "citation_validity": self.scorer.citation_validity(generation.text, passages),
                "relevance": self._relevance(generation),
            }
        )

    def _relevance(self, generation: Generation) -> float | None:
        question = latest_question(generation.request.messages)
        if question is None:  # no user turn with text
            return None
        return cosine_of(self.embedder, question, generation.text)
