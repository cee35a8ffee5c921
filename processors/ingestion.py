"""Ingestion: the one place where requests are checked before they cost anything."""

from __future__ import annotations

import time
from dataclasses import dataclass

from processors.base import Emit, Rejected
from schemas import Request
from topics import RETRIEVAL


@dataclass(frozen=True)
class IngestionPolicy:
    max_prompt_chars: int = 8000
    max_tokens_cap: int = 1024
    default_max_tokens: int = 64


class Ingestion:
    """Validates a decoded request and forwards it, normalised, to retrieval."""

    def __init__(self, policy: IngestionPolicy | None = None) -> None:
        self.policy = policy or IngestionPolicy()

    def process(self, request: Request, *, now: float | None = None) -> list[Emit]:
        p = self.policy
        prompt = request.prompt.strip()
        if not prompt:
            raise Rejected("prompt is empty or only whitespace")
        if len(prompt) > p.max_prompt_chars:
            raise Rejected(f"prompt has {len(prompt)} characters, limit is {p.max_prompt_chars}")
        if request.max_tokens is not None and request.max_tokens > p.max_tokens_cap:
            raise Rejected(f"max_tokens {request.max_tokens} exceeds the cap of {p.max_tokens_cap}")
        now = time.time() if now is None else now
        if request.deadline_at is not None and request.deadline_at <= now:
            raise Rejected(f"deadline passed {now - request.deadline_at:.3f}s before ingestion")
        normalised = request.model_copy(
            update={"prompt": prompt, "max_tokens": request.max_tokens or p.default_max_tokens}
        )
        return [Emit(RETRIEVAL, request.request_id, normalised)]
