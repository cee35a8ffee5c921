"""Streamed answers, moderated window by window before any of it reaches a caller.

Raw deltas (llm.tokens) accumulate per request; each complete sentence, or
``max_window_chars`` of text without one, is a window that goes through the
same checks as a whole answer. An allowed or redacted window is published to
llm.tokens.moderated, the only token topic a caller's gateway reads. A blocked
window ends the stream there with finish reason ``content_filter``; nothing
after it is published. The engine's final delta flushes the rest and closes
the moderated stream with the engine's finish reason.

State per request id (the token topics' key) lives in the runtime's keyed
state, with a changelog, so a restarted stage, or the next owner of a partition,
resumes each stream where its commit left it. A raw delta whose index was already
taken in (a replay) is ignored. A window cut for length never ends inside a run of
digits: a card or phone number goes to the redactor whole.
"""

from __future__ import annotations

import re
from datetime import timedelta

from processors.admission import KeyedState
from processors.base import Emit
from processors.moderation import Context, Moderated, Moderator, Verdict, event
from schemas import TokenDelta
from topics import MODERATED_TOKENS, MODERATION_EVENTS

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
# A run of digits and the separators numbers are written with, at the end of a window:
# possibly the first part of a card or phone number, held back for the next window so
# that the redactor sees the number whole.
_NUMBER_TAIL = re.compile(r"[\d(+][\d \-().+/]*$")
DONE_TTL = timedelta(hours=1)
TAIL_CHARS = 400  # enough for any phrase, pattern or 8-word run across a boundary


def cut_windows(buffer: str, max_chars: int) -> tuple[list[str], str]:
    """Complete windows at the front of ``buffer``, and the rest (kept for later)."""
    windows, start = [], 0
    for m in _SENTENCE_END.finditer(buffer):
        windows.append(buffer[start : m.end()])
        start = m.end()
    rest = buffer[start:]
    while len(rest) > max_chars:
        cut = rest.rfind(" ", 0, max_chars)
        cut = cut if cut > 0 else max_chars
        number = _NUMBER_TAIL.search(rest, 0, cut)
        if number is not None and number.start() > 0:
            cut = number.start()
        windows.append(rest[:cut])
        rest = rest[cut:]
    return windows, rest


class StreamModerator:
    def __init__(self, moderator: Moderator, max_window_chars: int = 240) -> None:
        self.moderator = moderator
        self.max_window_chars = max_window_chars

    def process(self, delta: TokenDelta, state: KeyedState) -> list[Emit]:
        if state.get("done"):
            return []  # the stream was closed (blocked or finished): a replay or a straggler
        if delta.index < int(state.get("next", 0)):
            return []  # a delta already taken in (a replay): appending it would repeat text
        state.set("next", delta.index + 1, ttl=DONE_TTL)
        if delta.index == 0:
            ctx = {"prompt": delta.prompt, "instructions": delta.instructions}
            state.set("ctx", ctx, ttl=DONE_TTL)
        buffer = str(state.get("buffer", "")) + delta.text
        windows, rest = cut_windows(buffer, self.max_window_chars)
        if delta.final and rest:
            windows.append(rest)
            rest = ""
        out: list[Emit] = []
        for text in windows:
            out.extend(self._window(delta, text, state))
            if state.get("done"):
                return out
        state.set("buffer", rest, ttl=DONE_TTL)
        if delta.final:
            verdict: Verdict = "redacted" if state.get("redacted") else "allowed"
            out.append(self._close(delta, state, delta.finish_reason or "stop", verdict, []))
        return out

    def _window(self, delta: TokenDelta, text: str, state: KeyedState) -> list[Emit]:
        result = self._moderate(delta, text, state)
        index = int(state.get("n", 0))
        out = []
        policy = self.moderator.checks.policies.for_tenant(delta.tenant).tag
        if result.verdict != "allowed":
            ev = event(delta.request_id, delta.tenant, result, policy, window=index)
            out.append(Emit(MODERATION_EVENTS, delta.request_id, ev))
        if result.verdict == "blocked":
            out.append(self._close(delta, state, "content_filter", "blocked", result.reasons))
            return out
        text, over = self._within_cap(delta.tenant, result.text, state)
        result = Moderated(text, "redacted" if over else result.verdict, result.findings)
        state.set("n", index + 1, ttl=DONE_TTL)
        # The end of what was sent, for checks that look across the next boundary.
        tail = (str(state.get("tail", "")) + result.text)[-TAIL_CHARS:]
        state.set("tail", tail, ttl=DONE_TTL)
        if result.verdict == "redacted":
            state.set("redacted", True, ttl=DONE_TTL)
        window = TokenDelta(
            request_id=delta.request_id,
            index=index,
            text=result.text,
            model=delta.model,
            tenant=delta.tenant,
            verdict=result.verdict,
            reasons=result.reasons,
        )
        out.append(Emit(MODERATED_TOKENS, delta.request_id, window))
        if over:
            reason = "policy: answer cut at the policy's max_chars"
            out.append(self._close(delta, state, "length", "redacted", [reason]))
        return out

    def _within_cap(self, tenant: str, text: str, state: KeyedState) -> tuple[str, bool]:
        """The window cut to what the policy's max_chars leaves of the whole answer."""
        cap = self.moderator.checks.policies.for_tenant(tenant).max_chars
        sent = int(state.get("chars", 0))
        if cap is not None and sent + len(text) > cap:
            return text[: max(0, cap - sent)], True
        state.set("chars", sent + len(text), ttl=DONE_TTL)
        return text, False

    def _moderate(self, delta: TokenDelta, text: str, state: KeyedState) -> Moderated:
        system = None
        lookup = self.moderator.system_prompt_for
        if lookup is not None and delta.template:
            system = lookup(delta.template)
        known = state.get("ctx") or {}
        ctx = Context(
            delta.tenant,
            system,
            known.get("prompt"),
            delta.injection_flagged,
            instructions=known.get("instructions"),
        )
        return self.moderator.checks.moderate(text, ctx, preceding=str(state.get("tail", "")))

    def _close(
        self,
        delta: TokenDelta,
        state: KeyedState,
        finish_reason: str,
        verdict: Verdict,
        reasons: list[str],
    ) -> Emit:
        state.set("done", True, ttl=DONE_TTL)
        state.set("buffer", "", ttl=DONE_TTL)
        last = TokenDelta(
            request_id=delta.request_id,
            index=int(state.get("n", 0)),
            text="",
            model=delta.model,
            tenant=delta.tenant,
            final=True,
            finish_reason=finish_reason,
            verdict=verdict,
            reasons=reasons,
        )
        return Emit(MODERATED_TOKENS, delta.request_id, last)
