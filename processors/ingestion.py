"""Ingestion: the one place where requests are checked before they cost anything.

In order, cheapest first: shape and size limits, then admission (a request id
is answered once; the tenant's quota), then the guardrails (prompt-injection
screen on every turn as written, PII redaction of every turn), then the prompt
template variant, which may leave out the caller's own system turns. Only the
redacted conversation leaves this stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from processors.admission import Admission, KeyedState
from processors.base import Emit, Rejected
from processors.guardrails import GuardrailError, Guardrails
from processors.templates import TemplateCatalog
from schemas import ChatTurn, Request
from schemas.chat import INSTRUCTION_ROLES
from topics import RETRIEVAL

TEMPLATE = "rag"


@dataclass(frozen=True)
class IngestionPolicy:
    max_prompt_chars: int = 8000
    """The latest user turn (the question)."""
    max_conversation_chars: int = 32_000
    """Every turn together."""
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
        self._check_shape(request, now)
        if self.admission is not None and state is not None:
            self.admission.admit(request, state, now)
        turns = [m for m in map(_stripped, request.messages) if m.content or m.tool_calls]
        update: dict[str, object] = {
            "max_tokens": request.max_tokens or self.policy.default_max_tokens,
        }
        if self.guardrails is not None:
            turns, found = self._screened(request.tenant, turns)
            update |= found
        if self.templates is not None:
            assigned = self.templates.assign(TEMPLATE, request.request_id)
            update["template"] = assigned.tag
            if assigned.locks_instructions:
                kept = [m for m in turns if m.role not in INSTRUCTION_ROLES]
                update["instructions_dropped"] = len(turns) - len(kept)
                turns = kept
        update["messages"] = turns
        if self.admission is not None and state is not None:
            self.admission.accepted(request, state, now)
        return [Emit(RETRIEVAL, request.request_id, request.model_copy(update=update))]

    def _screened(
        self, tenant: str, turns: list[ChatTurn]
    ) -> tuple[list[ChatTurn], dict[str, object]]:
        """Every turn (and every tool call's arguments) PII-redacted, and the conversation
        judged by its riskiest turn."""
        assert self.guardrails is not None
        # Tool-call arguments are the caller's text too: screened and redacted alike.
        calls = [(i, j) for i, m in enumerate(turns) for j in range(len(m.tool_calls))]
        texts = [m.content for m in turns]
        texts += [turns[i].tool_calls[j].function.arguments for i, j in calls]
        try:
            screened = self.guardrails.screen_turns(tenant, texts)
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
        contents, arguments = screened.texts[: len(turns)], screened.texts[len(turns) :]
        redacted = [
            m.model_copy(update={"content": text}) for m, text in zip(turns, contents, strict=True)
        ]
        for (i, j), text in zip(calls, arguments, strict=True):
            turn = redacted[i]
            call = turn.tool_calls[j]
            function = call.function.model_copy(update={"arguments": text})
            kept = list(turn.tool_calls)
            kept[j] = call.model_copy(update={"function": function})
            redacted[i] = turn.model_copy(update={"tool_calls": kept})
        return redacted, {
            "pii": list(screened.pii),
            "injection_score": round(screened.injection_score, 4),
            "flagged": screened.verdict == "flag",
        }

    def _check_shape(self, request: Request, now: float) -> None:
        p = self.policy
        prompt = request.prompt.strip()  # never empty: the schema needs a question
        if len(prompt) > p.max_prompt_chars:
            raise Rejected(f"prompt has {len(prompt)} characters, limit is {p.max_prompt_chars}")
        total = sum(len(m.content) for m in request.messages)
        if total > p.max_conversation_chars:
            raise Rejected(
                f"the conversation has {total} characters, limit is {p.max_conversation_chars}"
            )
        if request.max_tokens is not None and request.max_tokens > p.max_tokens_cap:
            raise Rejected(f"max_tokens {request.max_tokens} exceeds the cap of {p.max_tokens_cap}")
        if request.deadline_at is not None and request.deadline_at <= now:
            raise Rejected(
                f"deadline passed {now - request.deadline_at:.3f}s before ingestion",
                code="deadline_exceeded",
            )


def _stripped(turn: ChatTurn) -> ChatTurn:
    return turn.model_copy(update={"content": turn.content.strip()})
