"""Recent outcomes of Idempotency-Key requests, as one gateway replica saw them.

Every replica reads every response (kllm.gateway.replies), so each one learns the
outcome of a keyed request whichever replica published it: a caller retrying on
another replica, after its own connection dropped, is answered at once from here.
Only final answers are given again (processors.openai_api.replayable); an error a
retry may change (429, a timeout, a failure inside the pipeline) is kept as a
failed attempt instead, so the retry runs as the next attempt rather than wait for
an answer that is not coming. Bounded in size and in time; thread safe (the router's
thread writes, the event loop reads).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from processors import openai_api as api
from processors.admission import idempotency_parts
from schemas import Response

MAX_ATTEMPTS = 100
"""Attempts of one key and body looked up before giving up on finding a free one."""


@dataclass(frozen=True)
class Kept:
    expires: float
    response: Response
    final: bool


class RecentAnswers:
    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def remember(self, response: Response, at: float | None = None) -> None:
        """Keep the outcome of a keyed request (others are never asked for again), for
        the ttl from ``at`` (the record's time, wall clock; default: now)."""
        if self.ttl_s <= 0 or idempotency_parts(response.request_id) is None:
            return
        now = self.clock()
        kept = Kept((now if at is None else at) + self.ttl_s, response, api.replayable(response))
        if kept.expires <= now:
            return
        with self._lock:
            self._kept.pop(response.request_id, None)
            self._kept[response.request_id] = kept
            while self._kept and (
                len(self._kept) > self.max_entries or next(iter(self._kept.values())).expires <= now
            ):
                self._kept.popitem(last=False)

    def _get(self, request_id: str) -> Kept | None:
        with self._lock:
            kept = self._kept.get(request_id)
        if kept is None or kept.expires <= self.clock():
            return None
        return kept

    def answer(self, request_id: str) -> Response | None:
        """The final answer to ``request_id``, if one went by lately."""
        kept = self._get(request_id)
        return kept.response if kept is not None and kept.final else None

    def attempt_id(self, request_id: str) -> str:
        """The id a request named ``request_id`` (a first attempt) goes out under: the
        first attempt not known to have failed. Every replica saw the same failures,
        so every replica picks the same one."""
        if idempotency_parts(request_id) is None:
            return request_id
        for attempt in range(1, MAX_ATTEMPTS + 1):
            rid = request_id if attempt == 1 else f"{request_id}.{attempt}"
            kept = self._get(rid)
            if kept is None or kept.final:
                return rid
        return f"{request_id}.{MAX_ATTEMPTS}"
