"""Ingestion guardrails: score a prompt for prompt injection and redact its PII.

The models stay behind two small protocols (``Redactor``, ``InjectionScorer``); the
adapters in ``kllm.adapters.guardrails`` (``pii``, ``injection``) implement them with
presidio and guardify. What is decided here is pure: the verdict per tenant policy.
Injection is scored on the original prompt: the classifier was trained on raw prompts,
never on placeholders such as ``<PERSON>``, and the sender's own words carry the intent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, Protocol

from kllm.core.errors import ConfigError, PipelineError

ScreenVerdict = Literal["allow", "flag", "block"]


class GuardrailError(PipelineError):
    """A screening model (PII redactor or injection scorer) failed on a text."""


@dataclass(frozen=True)
class Redaction:
    """Redacted text and the entity types replaced in it, in order of appearance."""

    text: str
    entities: tuple[str, ...]


class Redactor(Protocol):
    def redact(self, text: str) -> Redaction: ...

    def redact_batch(self, texts: Sequence[str]) -> list[Redaction]: ...


class InjectionScorer(Protocol):
    """Probability in [0, 1] that a text is a prompt-injection attempt."""

    def score(self, text: str) -> float: ...

    def score_batch(self, texts: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class InjectionPolicy:
    """Score thresholds. Defaults measured on guardify 1.0.1: ordinary questions
    scored <= 0.16, blatant injections >= 0.5 (its own decision boundary), and
    paraphrased ones mostly 0.25-0.5, which a human should review, not block."""

    block_at: float = 0.5
    flag_at: float = 0.25

    def __post_init__(self) -> None:
        # Written so that NaN fails too: every comparison with NaN is False.
        if not 0.0 <= self.flag_at <= self.block_at <= 1.0:
            raise ConfigError(
                f"injection policy wants 0 <= flag_at <= block_at <= 1, "
                f"got flag_at={self.flag_at}, block_at={self.block_at}"
            )

    def verdict(self, score: float) -> ScreenVerdict:
        if score >= self.block_at:
            return "block"
        return "flag" if score >= self.flag_at else "allow"


DEFAULT_POLICY = InjectionPolicy()
_POLICY_KEYS = frozenset(f.name for f in fields(InjectionPolicy))


@dataclass(frozen=True)
class Screened:
    """The prompt as it may travel on (PII redacted), and what screening found."""

    prompt: str
    pii: tuple[str, ...]
    injection_score: float
    verdict: ScreenVerdict


@dataclass(frozen=True)
class ScreenedTurns:
    """A conversation's turn texts as they may travel on, and what screening found."""

    texts: tuple[str, ...]
    pii: tuple[str, ...]
    injection_score: float
    verdict: ScreenVerdict


class Guardrails:
    def __init__(
        self,
        redactor: Redactor,
        scorer: InjectionScorer,
        default_policy: InjectionPolicy = DEFAULT_POLICY,
        tenant_policies: Mapping[str, InjectionPolicy] | None = None,
    ) -> None:
        self.redactor = redactor
        self.scorer = scorer
        self.default_policy = default_policy
        self.tenant_policies = dict(tenant_policies or {})

    def policy_for(self, tenant: str) -> InjectionPolicy:
        return self.tenant_policies.get(tenant, self.default_policy)

    def screen(self, tenant: str, prompt: str) -> Screened:
        score = self.scorer.score(prompt)  # the original text, before redaction
        return self._screened(tenant, self.redactor.redact(prompt), score)

    def screen_batch(self, items: Sequence[tuple[str, str]]) -> list[Screened]:
        """``screen`` for (tenant, prompt) pairs, one model call per model."""
        prompts = [prompt for _, prompt in items]
        scores = self.scorer.score_batch(prompts)
        redactions = self.redactor.redact_batch(prompts)
        if not len(scores) == len(redactions) == len(items):
            raise GuardrailError(
                f"{len(items)} prompts in, {len(scores)} scores and "
                f"{len(redactions)} redactions out"
            )
        return [
            self._screened(tenant, redaction, score)
            for (tenant, _), redaction, score in zip(items, redactions, scores, strict=True)
        ]

    def screen_turns(self, tenant: str, texts: Sequence[str]) -> ScreenedTurns:
        """``screen`` for a conversation's turns: each redacted, the riskiest turn's score
        judged (an injection can hide in any turn: an earlier one, or a tool's result)."""
        if not texts:
            raise GuardrailError("no turn to screen")
        screened = self.screen_batch([(tenant, text) for text in texts])
        score = max(s.injection_score for s in screened)
        return ScreenedTurns(
            tuple(s.prompt for s in screened),
            tuple(sorted({kind for s in screened for kind in s.pii})),
            score,
            self.policy_for(tenant).verdict(score),
        )

    def _screened(self, tenant: str, redaction: Redaction, score: float) -> Screened:
        # A NaN or out-of-range score would compare below every threshold and fail open.
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise GuardrailError(f"injection score {score} is not a probability")
        verdict = self.policy_for(tenant).verdict(score)
        return Screened(redaction.text, redaction.entities, score, verdict)


def parse_policies(
    raw: Mapping[str, Mapping[str, float]], base: InjectionPolicy = DEFAULT_POLICY
) -> dict[str, InjectionPolicy]:
    """Per-tenant policies from config such as ``{"acme": {"block_at": 0.9}}``;
    a key a tenant leaves out keeps its value from ``base``."""
    return {tenant: _parse_policy(tenant, values, base) for tenant, values in raw.items()}


def _parse_policy(tenant: str, values: object, base: InjectionPolicy) -> InjectionPolicy:
    where = f"guardrail policy for tenant {tenant!r}"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of thresholds, got {values!r}")
    unknown = sorted(str(k) for k in values.keys() - _POLICY_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"expected {', '.join(sorted(_POLICY_KEYS))}"
        )
    for key, value in values.items():
        # bool is an int in Python; a True threshold is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    thresholds = {k: float(values.get(k, getattr(base, k))) for k in _POLICY_KEYS}
    try:
        return InjectionPolicy(**thresholds)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
