"""Ingestion stage: llm.requests -> llm.retrieval (bad input -> llm.requests.dlq).

Stateful per tenant (the request topic's key): request ids seen, and quota
use per minute, in the runtime's state store.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kllm.adapters.guardrails.pii import PATTERN_ENTITIES
from kllm.runtime import logs, tracing
from kllm.runtime.dispatch import StageLogic
from kllm.runtime.quix import serve
from kllm.runtime.settings import PROMPTS_DIR, StageSettings
from processors.admission import Admission, Quota, parse_quotas
from processors.guardrails import DEFAULT_POLICY, Guardrails, InjectionPolicy, parse_policies
from processors.ingestion import Ingestion, IngestionPolicy
from processors.templates import load_templates
from schemas import Request
from topics import REQUESTS

STAGE = "ingestion"
# The pattern-based entities; importing the adapter module is cheap (presidio loads lazily).
PII_ENTITIES = PATTERN_ENTITIES


class Settings(StageSettings):
    max_prompt_chars: int = 8000
    max_tokens_cap: int = 1024
    default_max_tokens: int = 64
    rpm: int | None = None
    """Requests per minute per tenant, unless ``quotas`` names the tenant; unset: no limit."""
    tpm: int | None = None
    """Tokens per minute per tenant (prompt estimate + max_tokens); unset: no limit."""
    quotas: dict[str, dict[str, int | None]] = Field(default_factory=dict)
    """Per-tenant quotas, e.g. {"acme": {"rpm": 60, "tpm": 20000}}."""
    dedupe_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a request id is remembered: a repeat within it is not answered twice."""
    guardrails: bool = True
    pii_entities: list[str] = Field(default_factory=lambda: list(PII_ENTITIES))
    """Presidio entity types to redact. PERSON and LOCATION are left out by default:
    spaCy's small model tags product names (Kafka, Redis, Docker) as people."""
    pii_allow_list: list[str] = Field(default_factory=list)
    """Words never redacted, e.g. product names, when PERSON or LOCATION are enabled."""
    injection_block_at: float = DEFAULT_POLICY.block_at
    injection_flag_at: float = DEFAULT_POLICY.flag_at
    injection_policies: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Per-tenant thresholds, e.g. {"acme": {"block_at": 0.9, "flag_at": 0.6}}."""
    templates_dir: Path = PROMPTS_DIR


def build_guardrails(settings: Settings) -> Guardrails:
    from kllm.adapters.guardrails.injection import GuardifyScorer
    from kllm.adapters.guardrails.pii import PresidioRedactor

    redactor = PresidioRedactor(settings.pii_entities, allow_list=settings.pii_allow_list)
    return Guardrails(
        redactor,
        GuardifyScorer(),
        InjectionPolicy(block_at=settings.injection_block_at, flag_at=settings.injection_flag_at),
        parse_policies(settings.injection_policies),
    )


def build(settings: Settings, *, guardrails: Guardrails | None = None) -> StageLogic[Request]:
    policy = IngestionPolicy(
        max_prompt_chars=settings.max_prompt_chars,
        max_tokens_cap=settings.max_tokens_cap,
        default_max_tokens=settings.default_max_tokens,
    )
    admission = Admission(
        default=Quota(rpm=settings.rpm, tpm=settings.tpm),
        per_tenant=parse_quotas(settings.quotas),
        dedupe_ttl_s=settings.dedupe_ttl_s,
        default_max_tokens=settings.default_max_tokens,
    )
    if guardrails is None and settings.guardrails:
        guardrails = build_guardrails(settings)
    ingestion = Ingestion(
        policy,
        admission=admission,
        guardrails=guardrails,
        templates=load_templates(settings.templates_dir),
    )
    return StageLogic(STAGE, Request, ingestion.process, process_keyed=ingestion.process)


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    serve(settings, REQUESTS, build(settings))


if __name__ == "__main__":
    main()
