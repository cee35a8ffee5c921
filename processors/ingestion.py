"""Ingestion: the one place where requests are checked before they cost anything.

In order, cheapest first: shape and size limits, then admission (a request id
is answered once; the tenant's quota), then the guardrails (prompt-injection
screen on the prompt as written, PII redaction), then the prompt template
variant. Only the redacted prompt leaves this stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from processors.admission import Admission, KeyedState
from processors.base import Emit, Rejected
from processors.guardrails import GuardrailError, Guardrails
from processors.templates import TemplateCatalog
from schemas import Request
from topics import RETRIEVAL

TEMPLATE = "rag"


@dataclass(frozen=True)
class IngestionPolicy:
    max_prompt_chars: int = 8000
    max_tokens_cap: int = 1024
    default_max_tokens: int = 64


class Ingestion:
    """Validates a decoded request and forwards it, normalised, to retrieval."""

    def __init__(
        self,
        policy: IngestionPolicy | None = None,
        *,
        admission: Admission | None = None,
        guardrails: Guardrails | None = None,
        templates: TemplateCatalog | None = None,
    ) -> None:
        self.policy = policy or IngestionPolicy()
        self.admission = admission
        self.guardrails = guardrails
        self.templates = templates

    def process(
        self, request: Request, state: KeyedState | None = None, *, now: float | None = None
    ) -> list[Emit]:
        now = time.time() if now is None else now
        prompt = self._check_shape(request, now)
        if self.admission is not None and state is not None:
            self.admission.admit(request, state, now)
        update: dict[str, object] = {
            "prompt": prompt,
            "max_tokens": request.max_tokens or self.policy.default_max_tokens,
        }
        if self.guardrails is not None:
            try:
                screened = self.guardrails.screen(request.tenant, prompt)
            except GuardrailError as exc:
                # A screening model's failure is ours, not the caller's: 503, retry.
                raise Rejected(
                    f"the guardrails could not screen the prompt: {exc}",
                    code="unavailable",
                    retry_after_s=1.0,
                ) from exc
            if screened.verdict == "block":
                raise Rejected(
                    f"prompt blocked as a likely injection attempt "
                    f"(score {screened.injection_score:.2f})",
                    code="prompt_blocked",
                )
            update |= {
                "prompt": screened.prompt,
                "pii": list(screened.pii),
                "injection_score": round(screened.injection_score, 4),
                "flagged": screened.verdict == "flag",
            }
        if self.templates is not None:
            update["template"] = self.templates.assign(TEMPLATE, request.request_id).tag
        if self.admission is not None and state is not None:
            self.admission.accepted(request, state, now)
        return [Emit(RETRIEVAL, request.request_id, request.model_copy(update=update))]

    def _check_shape(self, request: Request, now: float) -> str:
        p = self.policy
        prompt = request.prompt.strip()
        if not prompt:
            raise Rejected("prompt is empty or only whitespace")
        if len(prompt) > p.max_prompt_chars:
            raise Rejected(f"prompt has {len(prompt)} characters, limit is {p.max_prompt_chars}")
        if request.max_tokens is not None and request.max_tokens > p.max_tokens_cap:
            raise Rejected(f"max_tokens {request.max_tokens} exceeds the cap of {p.max_tokens_cap}")
        if request.deadline_at is not None and request.deadline_at <= now:
            raise Rejected(
                f"deadline passed {now - request.deadline_at:.3f}s before ingestion",
                code="deadline_exceeded",
            )
        return prompt
