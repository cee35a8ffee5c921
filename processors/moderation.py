"""Output moderation: what the caller may read of an answer, whole or streamed.

Four checks, each a finding with an action:
- toxicity: a text classifier's score at or above a threshold blocks;
- pii: personal data leaking into the answer is redacted;
- policy: per-tenant rules (denied topics and block patterns block; redact
  patterns and a length cap redact);
- echo: an answer repeating a run of words from the system prompt (the template's
  or the caller's own), or from a prompt that ingestion flagged as a likely
  injection, is blocked.
An answer in JSON mode is redacted inside its string values only.
Any block withholds the text; otherwise any redaction makes it "redacted".

Streaming answers are moderated in windows (sentences, or at most
``max_window_chars``) before any of it reaches the caller: see ``StreamModerator``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from processors.answering import Grounded, GroundedAnswerer
from processors.answering import Policy as AnswerPolicy
from processors.base import Emit
from processors.conversation import latest_question, search_text
from processors.guardrails import Redactor
from processors.policies import Policy, PolicyBook
from schemas import Citation, Generation, ModerationEvent, Request, Response
from schemas.chat import ToolCall
from schemas.messages import Choice
from topics import MODERATION_EVENTS, RESPONSES

BLOCKED_TEXT = "This answer was withheld by output moderation."
REDACTED = "[REDACTED]"
CHECKS = ("toxicity", "pii", "policy", "echo")
Verdict = Literal["allowed", "redacted", "blocked"]
_WORD = re.compile(r"\w+")


class TextClassifier(Protocol):
    """Scores texts in [0, 1]; higher means more likely to violate the policy."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class Finding:
    check: str
    action: Literal["redact", "block"]
    reason: str


@dataclass(frozen=True)
class Moderated:
    text: str
    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return [f"{f.check}: {f.reason}" for f in self.findings]

    def flagged(self, check: str) -> bool:
        return any(f.check == check for f in self.findings)


@dataclass(frozen=True)
class Context:
    """What moderation knows about the request an answer belongs to."""

    tenant: str
    system_prompt: str | None = None
    prompt: str | None = None
    injection_flagged: bool = False
    instructions: str | None = None
    """The caller's own system and developer turns."""
    json_mode: bool = False
    """The answer is JSON: redact inside its string values, so it stays valid."""
    uncapped: bool = False
    """The policy's length cap does not apply (tool-call arguments: a cut would leave
    JSON no tool can read)."""


def shared_run(text: str, source: str, min_words: int) -> bool:
    """True when ``text`` repeats ``min_words`` consecutive words of ``source``."""
    src = [w.lower() for w in _WORD.findall(source)]
    grams = {tuple(src[i : i + min_words]) for i in range(len(src) - min_words + 1)}
    words = [w.lower() for w in _WORD.findall(text)]
    return any(tuple(words[i : i + min_words]) in grams for i in range(len(words) - min_words + 1))


class OutputModerator:
    def __init__(
        self,
        classifier: TextClassifier,
        redactor: Redactor | None,
        policies: PolicyBook,
        toxicity_block_at: float = 0.8,
        echo_min_words: int = 8,
    ) -> None:
        self.classifier = classifier
        self.redactor = redactor
        self.policies = policies
        self.toxicity_block_at = toxicity_block_at
        self.echo_min_words = echo_min_words

    def moderate(self, text: str, ctx: Context, preceding: str = "") -> Moderated:
        """``preceding``: the end of what was already published of the same answer (a
        stream's earlier windows), so a denied phrase, a block pattern or an echo running
        across a window boundary counts."""
        policy = self.policies.for_tenant(ctx.tenant)
        if ctx.uncapped:
            policy = replace(policy, max_chars=None)
        if not text.strip():
            return Moderated(text, "allowed")
        (toxicity,) = self.classifier.score([text])
        scores = {self.classifier.name: round(toxicity, 4)}
        blocks = self._blocks(text, toxicity, policy, ctx, preceding)
        if blocks:
            return Moderated(BLOCKED_TEXT, "blocked", tuple(blocks), scores)
        if ctx.json_mode:
            text, redactions = self._redact_json(text, policy)
        else:
            text, redactions = self._redact(text, policy)
        return Moderated(text, "redacted" if redactions else "allowed", tuple(redactions), scores)

    def _blocks(
        self, text: str, toxicity: float, policy: Policy, ctx: Context, preceding: str
    ) -> list[Finding]:
        found = []
        if not toxicity < self.toxicity_block_at:  # NaN too: no score, no pass
            reason = f"{self.classifier.name} score {toxicity:.2f} >= {self.toxicity_block_at}"
            found.append(Finding("toxicity", "block", reason))
        # Phrases and patterns may straddle a stream's window boundary: look across it.
        span = preceding + text  # exactly as the caller reads them, one after the other
        lowered = span.lower()
        for topic, phrases in policy.deny_topics.items():
            if any(p in lowered for p in phrases):
                found.append(Finding("policy", "block", f"denied topic {topic!r}"))
        for pattern in policy.block_patterns:
            if pattern.search(span):
                found.append(Finding("policy", "block", f"matches /{pattern.pattern}/"))
        n = self.echo_min_words
        if ctx.system_prompt and shared_run(span, ctx.system_prompt, n):
            found.append(Finding("echo", "block", f"repeats {n}+ words of the system prompt"))
        if ctx.instructions and shared_run(span, ctx.instructions, n):
            reason = f"repeats {n}+ words of the caller's system prompt"
            found.append(Finding("echo", "block", reason))
        if ctx.injection_flagged and ctx.prompt and shared_run(span, ctx.prompt, n):
            reason = f"repeats {n}+ words of a prompt flagged as injection"
            found.append(Finding("echo", "block", reason))
        return found

    def _redact_json(self, text: str, policy: Policy) -> tuple[str, list[Finding]]:
        """Redaction inside a JSON answer's string values only (keys and structure are
        left alone, so the answer stays valid JSON). An answer that is not JSON, such
        as one cut at max_tokens, is redacted as text."""
        try:
            value = json.loads(text)
        except ValueError:
            return self._redact(text, policy)
        found: list[Finding] = []
        per_string = replace(policy, max_chars=None)  # the cap applies to the whole answer

        def walk(node: Any) -> Any:
            if isinstance(node, str):
                redacted, findings = self._redact(node, per_string)
                found.extend(findings)
                return redacted
            if isinstance(node, list):
                return [walk(item) for item in node]
            if isinstance(node, dict):
                return {key: walk(item) for key, item in node.items()}
            return node

        walked = walk(value)
        out = json.dumps(walked, ensure_ascii=False) if found else text
        if policy.max_chars is not None and len(out) > policy.max_chars:
            out = out[: policy.max_chars]  # the policy's cap wins over valid JSON
            found.append(Finding("policy", "redact", f"cut to {policy.max_chars} characters"))
        return out, _merged(found)

    def _redact(self, text: str, policy: Policy) -> tuple[str, list[Finding]]:
        found = []
        if self.redactor is not None:
            redaction = self.redactor.redact(text)
            if redaction.entities:
                text = redaction.text
                kinds = ", ".join(sorted(set(redaction.entities)))
                found.append(Finding("pii", "redact", kinds))
        for pattern in policy.redact_patterns:
            text, n = pattern.subn(REDACTED, text)
            if n:
                found.append(Finding("policy", "redact", f"{n} match(es) of /{pattern.pattern}/"))
        if policy.max_chars is not None and len(text) > policy.max_chars:
            text = text[: policy.max_chars]
            found.append(Finding("policy", "redact", f"cut to {policy.max_chars} characters"))
        return text, found


def _merged(findings: list[Finding]) -> list[Finding]:
    """One finding per check and reason, in the order first found."""
    return list(dict.fromkeys(findings))


class Moderator:
    """The moderation stage's whole-answer path: a generation becomes the caller's
    response and a moderation event."""

    def __init__(
        self,
        checks: OutputModerator,
        system_prompt_for: Callable[[str], str] | None = None,
        *,
        answerer: GroundedAnswerer | None = None,
        answer_policy: AnswerPolicy = "off",
    ) -> None:
        self.checks = checks
        self.system_prompt_for = system_prompt_for
        self.answerer = answerer if answerer is not None else GroundedAnswerer()
        self.answer_policy = answer_policy

    def ground(self, generation: Generation, json_mode: bool) -> Grounded | None:
        """The grounded answer in place of the generated one (see `processors.answering`);
        None where it does not apply: the policy is off, the engine failed, the answer is
        JSON, or it calls tools or answers from tool results (the passages are not its
        evidence then). A streamed answer has reached its caller already: it is scored,
        never replaced."""
        request = generation.request
        if (
            self.answer_policy == "off"
            or generation.error
            or generation.tool_calls
            or json_mode
            or request.tools
            or any(m.role == "tool" for m in request.messages)
        ):
            return None
        question = latest_question(request.messages)
        if question is None:  # no user turn with text: nothing to ground against
            return None
        return self.answerer.answer(
            question,
            search_text(request),
            generation.text,
            [c.text for c in generation.chunks],
            [c.score for c in generation.chunks],
            replace=self.answer_policy == "grounded" and not request.stream,
        )

    def context(self, request: Request) -> Context:
        system = None
        if self.system_prompt_for is not None and request.template:
            system = self.system_prompt_for(request.template)
        json_mode = request.response_format is not None and request.response_format.json_mode()
        return Context(
            request.tenant,
            system,
            request.prompt,
            request.flagged,
            instructions=request.instructions(),
            json_mode=json_mode,
        )

    def process(self, generation: Generation, *, now: float | None = None) -> list[Emit]:
        request = generation.request
        policy = self.checks.policies.for_tenant(request.tenant).tag
        ctx = self.context(request)
        grounded = self.ground(generation, ctx.json_mode)
        text = generation.text if grounded is None else grounded.text
        result, calls = self.judge(text, generation.tool_calls, ctx)
        judged = [
            (alt, *self.judge(alt.text, alt.tool_calls, ctx)) for alt in generation.alternatives
        ]
        blocked = result.verdict == "blocked"
        now = time.time() if now is None else now
        response = Response(
            request_id=request.request_id,
            tenant=request.tenant,
            text=result.text,
            verdict=result.verdict,
            reasons=result.reasons,
            model=generation.model,
            finish_reason="content_filter" if blocked else generation.finish_reason,
            usage=generation.usage,
            citations=[
                Citation(chunk_id=c.chunk_id, doc_id=c.doc_id, score=c.score)
                for c in generation.chunks
            ],
            engine_ms=generation.latency_ms,
            ttft_ms=generation.ttft_ms,
            cost_usd=generation.cost_usd,
            pipeline_ms=max(0.0, (now - request.created_at) * 1000),
            error=generation.error,
            error_code="engine_error" if generation.error else None,
            template=request.template,
            policy=policy,
            instructions_dropped=request.instructions_dropped,
            trimmed_turns=request.trimmed_turns,
            fallback=generation.fallback,
            alternatives=[_moderated_choice(alt, r, c) for alt, r, c in judged],
            tool_calls=calls,
            logprobs=generation.logprobs
            if request.logprobs and result.verdict == "allowed" and text == generation.text
            else None,
            answer_mode=grounded.mode if grounded is not None else "generated",
            groundedness=grounded.groundedness if grounded is not None else None,
        )
        out = [
            Emit(RESPONSES, request.request_id, response),
            Emit(
                MODERATION_EVENTS,
                request.request_id,
                event(request.request_id, request.tenant, result, policy),
            ),
        ]
        for alt, r, _ in judged:
            if r.verdict != "allowed":
                ev = event(request.request_id, request.tenant, r, policy)
                ev = ev.model_copy(
                    update={"reasons": [f"choice {alt.index}: {x}" for x in r.reasons]}
                )
                out.append(Emit(MODERATION_EVENTS, request.request_id, ev))
        return out

    def judge(
        self, text: str, calls: Sequence[ToolCall], ctx: Context
    ) -> tuple[Moderated, list[ToolCall]]:
        """One answer's text and tool calls judged together. Arguments are JSON: they
        are redacted inside their string values. A blocked call blocks the answer."""
        result = self.checks.moderate(text, ctx)
        as_json = replace(ctx, json_mode=True, uncapped=True)
        kept, findings, scores = [], list(result.findings), dict(result.scores)
        for call in calls:
            judged = self.checks.moderate(call.function.arguments, as_json)
            name = call.function.name
            findings += [
                replace(f, reason=f"tool call {name}: {f.reason}") for f in judged.findings
            ]
            for key, score in judged.scores.items():
                scores[key] = max(score, scores.get(key, score))
            function = call.function.model_copy(update={"arguments": judged.text})
            kept.append(call.model_copy(update={"function": function}))
        if any(f.action == "block" for f in findings):
            return Moderated(BLOCKED_TEXT, "blocked", tuple(findings), scores), []
        verdict: Verdict = "redacted" if findings else "allowed"
        return Moderated(result.text, verdict, tuple(findings), scores), kept


def _moderated_choice(choice: Choice, result: Moderated, calls: list[ToolCall]) -> Choice:
    blocked = result.verdict == "blocked"
    return choice.model_copy(
        update={
            "text": result.text,
            "verdict": result.verdict,
            "finish_reason": "content_filter" if blocked else choice.finish_reason,
            "tool_calls": calls,
        }
    )


def event(
    request_id: str, tenant: str, result: Moderated, policy: str, window: int | None = None
) -> ModerationEvent:
    return ModerationEvent(
        request_id=request_id,
        tenant=tenant,
        verdict=result.verdict,
        scores=result.scores,
        reasons=result.reasons,
        checks=sorted({f.check for f in result.findings}),
        policy=policy,
        window=window,
    )
