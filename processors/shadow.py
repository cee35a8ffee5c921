"""Shadow answers: a candidate model (or template) on copies of real inference jobs.

Every request, its context and its prompt are already a record on ``llm.inference``, so a
candidate can answer the same jobs as the live model without touching a caller:
`kllm shadow start` follows live jobs in a consumer group of its own, and `kllm replay`
re-reads retained ones by time. Either way ``Shadow`` turns a job into the candidate's
copy and its answer into a record on ``llm.generations.shadow``, which the evaluation
stage scores beside the live answer and nobody answers a caller from.

The copy differs from the job in what the candidate is: the model, the template's
system prompt (when a candidate template is given), no stream (no caller reads its
tokens) and no deadline (a replayed job's deadline passed long ago). Sampling uses the
evaluation stage's draw: with a shadow sample at or under ``KLLM_EVAL_SAMPLE``, every
shadowed request has its live answer scored too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from processors.base import Emit, Outcome
from processors.templates import bucket
from schemas import ChatTurn, Generation, InferenceJob
from topics import GENERATIONS_SHADOW

__all__ = ["Shadow", "sample_draw"]


def sample_draw(request_id: str) -> float:
    """The request's draw in [0, 1): the same one the evaluation stage samples by."""
    return bucket("evaluation", 1, request_id)


class Shadow:
    """A candidate's copies of jobs. Hyperparameters: ``model`` (a model the generator
    serves), ``system``/``template`` (the candidate template's system prompt and tag;
    None keeps the job's), and ``sample`` (the share of jobs copied)."""

    def __init__(
        self,
        generate: Callable[[InferenceJob], Awaitable[Outcome]],
        model: str,
        *,
        system: str | None = None,
        template: str | None = None,
        sample: float = 1.0,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be in [0, 1], got {sample}")
        self.generate = generate
        self.model = model
        self.system = system
        self.template = template
        self.sample = sample

    def sampled(self, job: InferenceJob) -> bool:
        return self.sample > 0 and sample_draw(job.request.request_id) < self.sample

    def candidate(self, job: InferenceJob) -> InferenceJob:
        """The job as the candidate answers it (see the module docstring)."""
        changes: dict[str, object] = {"model": self.model, "stream": False, "deadline_at": None}
        if self.template is not None:
            changes["template"] = self.template
        request = job.request.model_copy(update=changes)
        messages = list(job.messages)
        if self.system is not None:
            if messages and messages[0].role == "system":
                messages[0] = messages[0].model_copy(update={"content": self.system})
            else:
                messages.insert(0, ChatTurn(role="system", content=self.system))
        return job.model_copy(update={"request": request, "messages": messages})

    async def answer(self, job: InferenceJob) -> list[Emit]:
        """The candidate's generation for a sampled job, on the shadow topic; nothing for
        the rest. Only generations leave: a shadow never dead-letters a job or answers
        its caller (the live stages own both)."""
        if not self.sampled(job):
            return []
        outcome = await self.generate(self.candidate(job))
        return [
            Emit(GENERATIONS_SHADOW, e.key, e.message)
            for e in outcome.emits
            if isinstance(e.message, Generation)
        ]
