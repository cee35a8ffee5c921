"""Moderation stage: whole answers (llm.generations -> llm.responses) and streamed
ones, window by window (llm.tokens -> llm.tokens.moderated), plus moderation
events for both. One consumer group reads both topics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from kllm.adapters.guardrails.pii import PATTERN_ENTITIES as PII_ENTITIES
from kllm.runtime import logs, tracing
from kllm.runtime.dispatch import StageLogic, keyed_only
from kllm.runtime.quix import serve_many
from kllm.runtime.settings import POLICIES_DIR, PROMPTS_DIR, StageSettings
from processors.answering import GroundedAnswerer
from processors.answering import Policy as AnswerPolicy
from processors.guardrails import Redactor
from processors.moderation import Moderator, OutputModerator, TextClassifier
from processors.policies import load_policies
from processors.streaming import StreamModerator
from processors.templates import load_templates
from schemas import Generation, TokenDelta
from topics import GENERATIONS, TOKENS, TopicSpec

STAGE = "moderation"


class Settings(StageSettings):
    profanity_threshold: float = 0.8
    """Toxicity: the classifier's score at or above which an answer is blocked."""
    output_pii_entities: list[str] = Field(default_factory=lambda: list(PII_ENTITIES))
    """Presidio entity types redacted from answers; empty: no PII check."""
    policies_dir: Path = POLICIES_DIR
    """Versioned per-tenant policies (v<N>.toml); the newest is in force."""
    templates_dir: Path = PROMPTS_DIR
    echo_min_words: int = Field(default=8, ge=3)
    """An answer repeating this many consecutive words of the system prompt is blocked."""
    max_window_chars: int = Field(default=240, ge=20)
    """A streamed window is a sentence, or at most this many characters without one."""
    answer_policy: AnswerPolicy = "grounded"
    """``grounded``: decline what the passages do not answer and quote the passages in
    place of an unsupported answer; ``flag``: only score it (``groundedness`` in the
    response); ``off``. See processors/answering.py and the README's golden-set table."""
    grounded_min_score: float = Field(default=0.3, ge=0.0, le=1.0)
    """The best passage's retrieval score under which the question is declined."""
    grounded_min_coverage: float = Field(default=0.3, ge=0.0, le=1.0)
    """The share of the question's words the passages must hold, or it is declined."""
    grounded_min_groundedness: float = Field(default=0.5, ge=0.0, le=1.0)
    """The supported share of its sentences under which a generated answer is replaced."""
    quote_sentences: int = Field(default=3, ge=1, le=10)
    """Passage sentences quoted in place of an unsupported answer."""


def build_checks(
    settings: Settings,
    *,
    classifier: TextClassifier | None = None,
    redactor: Redactor | None = None,
) -> OutputModerator:
    if classifier is None:
        from kllm.adapters.guardrails.profanity import ProfanityClassifier

        classifier = ProfanityClassifier()
    if redactor is None and settings.output_pii_entities:
        from kllm.adapters.guardrails.pii import PresidioRedactor

        redactor = PresidioRedactor(settings.output_pii_entities)
    return OutputModerator(
        classifier,
        redactor,
        load_policies(settings.policies_dir),
        toxicity_block_at=settings.profanity_threshold,
        echo_min_words=settings.echo_min_words,
    )


def build(
    settings: Settings,
    *,
    classifier: TextClassifier | None = None,
    redactor: Redactor | None = None,
) -> list[tuple[TopicSpec, StageLogic[Any]]]:
    checks = build_checks(settings, classifier=classifier, redactor=redactor)
    catalog = load_templates(settings.templates_dir)
    # Every system prompt the pipeline has, not only the request's variant: leaking
    # another version's or variant's instructions is a leak too.
    known = "\n\n".join(
        v.system
        for name in catalog.names()
        for version in catalog.versions(name)
        for v in catalog.get(name, version).variants
    )
    answerer = GroundedAnswerer(
        min_score=settings.grounded_min_score,
        min_coverage=settings.grounded_min_coverage,
        min_groundedness=settings.grounded_min_groundedness,
        quote_sentences=settings.quote_sentences,
    )
    moderator = Moderator(
        checks, lambda _tag: known, answerer=answerer, answer_policy=settings.answer_policy
    )
    stream = StreamModerator(moderator, settings.max_window_chars)
    return [
        (GENERATIONS, StageLogic(STAGE, Generation, moderator.process)),
        (TOKENS, StageLogic(STAGE, TokenDelta, keyed_only, process_keyed=stream.process)),
    ]


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    serve_many(settings, STAGE, build(settings))


if __name__ == "__main__":
    main()
