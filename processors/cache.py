"""Response cache per tenant: exact (same question) and semantic (a close embedding).

A question is looked up among answers to requests alike in everything else: the
same turns around it, sampling, token budget, output format, tools and model.
Only deterministic requests (temperature 0 or a seed) are served or stored.

It lives in the retrieval stage because that stage already embeds every
question. A miss is remembered (``expect``) with its embedding; when the
moderated response comes back on the responses topic, ``learn_one`` stores it.
Only clean answers are kept: allowed or redacted, finished, no error. Entries
are scoped by tenant, model and prompt template, so a cached answer never
crosses tenants or A/B variants. The state is plain data: it pickles.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import orjson

from processors.base import Emit
from processors.conversation import latest_question_index
from schemas import Citation, Request, Response

log = logging.getLogger(__name__)

Scope = tuple[str, str, str, str]  # tenant, model, template, the rest of the request
Kind = Literal["exact", "semantic"]
CACHEABLE_FINISH = frozenset({"stop", "length"})


def _setup_digest(request: Request) -> str:
    """What shapes an answer besides the question: the turns around it, the sampling,
    the token budget, the output format and the tools."""
    turns = [m.model_dump(mode="json") for m in request.messages]
    del turns[latest_question_index(request.messages)]
    shaping = {"sampling", "max_tokens", "response_format", "tools", "tool_choice"}
    setup = request.model_dump(mode="json", by_alias=True, include=shaping) | {"turns": turns}
    return hashlib.sha256(orjson.dumps(setup, option=orjson.OPT_SORT_KEYS)).hexdigest()


def scope_of(request: Request) -> Scope:
    """The shelf a request's answer lives on."""
    return (request.tenant, request.model or "", request.template or "", _setup_digest(request))


def cacheable_request(request: Request) -> bool:
    """Only a request whose answer does not change when asked again is served from the
    cache: greedy or seeded sampling, one choice, no log probabilities."""
    return request.sampling.deterministic() and request.n == 1 and not request.logprobs


def prompt_digest(prompt: str) -> str:
    """Exact-match key: case and runs of whitespace do not make a new question."""
    return hashlib.sha256(" ".join(prompt.lower().split()).encode()).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    model: str
    verdict: Literal["allowed", "redacted"]
    finish_reason: str
    citations: tuple[Citation, ...]
    expires_at: float


@dataclass(frozen=True)
class Hit:
    answer: CachedAnswer
    kind: Kind
    similarity: float


@dataclass
class _Pending:
    scope: Scope
    digest: str
    vector: npt.NDArray[np.float32]
    at: float
    epoch: int  # the tenant's corpus epoch when the question was asked


@dataclass
class _Shelf:
    """One scope's entries: digest -> answer, and the embeddings in insertion order."""

    exact: OrderedDict[str, CachedAnswer] = field(default_factory=OrderedDict)
    vectors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)


class ResponseCache:
    def __init__(
        self,
        similarity: float = 0.95,
        ttl_s: float = 3600.0,
        max_per_scope: int = 1000,
        max_pending: int = 10_000,
    ) -> None:
        self.similarity = similarity
        self.ttl_s = ttl_s
        self.max_per_scope = max_per_scope
        self.max_pending = max_pending
        self._shelves: dict[Scope, _Shelf] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._epochs: dict[str, int] = {}  # tenant -> corpus changes seen

    def invalidate(self, tenant: str, everyone: bool = False) -> int:
        """The tenant's documents changed (``everyone``: documents all tenants see): drop its
        answers, and the answers still on their way, whose sources may be gone. Returns how
        many answers were dropped."""
        scopes = [s for s in self._shelves if everyone or s[0] == tenant]
        dropped = sum(len(self._shelves.pop(s).exact) for s in scopes)
        for t in {s[0] for s in scopes} | {tenant}:
            self._epochs[t] = self._epochs.get(t, 0) + 1
        if everyone:
            for pending in self._pending.values():
                pending.epoch = -1
        return dropped

    def lookup_exact(self, request: Request, now: float) -> Hit | None:
        if not cacheable_request(request):
            return None
        shelf = self._shelves.get(scope_of(request))
        answer = shelf.exact.get(prompt_digest(request.prompt)) if shelf else None
        if answer is None or answer.expires_at <= now:
            return None
        return Hit(answer, "exact", 1.0)

    def lookup_similar(self, request: Request, vector: npt.ArrayLike, now: float) -> Hit | None:
        if not cacheable_request(request):
            return None
        shelf = self._shelves.get(scope_of(request))
        if not shelf or not shelf.vectors:
            return None
        digests = [d for d, a in shelf.exact.items() if a.expires_at > now]
        if not digests:
            return None
        matrix = np.stack([shelf.vectors[d] for d in digests])
        scores = matrix @ _unit(vector)
        best = int(np.argmax(scores))
        if float(scores[best]) < self.similarity:
            return None
        return Hit(shelf.exact[digests[best]], "semantic", float(scores[best]))

    def expect(self, request: Request, vector: npt.ArrayLike, now: float) -> None:
        """Remember a miss, so its answer can be stored when it comes back."""
        if not cacheable_request(request):
            return
        self._pending[request.request_id] = _Pending(
            scope_of(request),
            prompt_digest(request.prompt),
            _unit(vector),
            now,
            self._epochs.get(request.tenant, 0),
        )
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def learn_batch(self, responses: Sequence[Response], now: float | None = None) -> list[Emit]:
        """Store the answers to expected requests (the cache filler's batch); it
        publishes nothing."""
        when = time.time() if now is None else now
        stored = sum(self.learn_one(r, when) for r in responses)
        if stored:
            log.info("cache filled", extra={"stored": stored, "entries": len(self)})
        return []

    def learn_one(self, response: Response, now: float) -> bool:
        """Store the answer to an expected request; True when it was stored."""
        pending = self._pending.pop(response.request_id, None)
        if pending is None or not _cacheable(response):
            return False
        tenant, asked, template, setup = pending.scope
        if pending.epoch != self._epochs.get(tenant, 0):
            return False  # answered from a corpus that has changed since
        # A fallback's answer is kept under its own model: never served to a caller
        # who asked for the primary.
        scope = (tenant, response.model if response.fallback else asked, template, setup)
        shelf = self._shelves.setdefault(scope, _Shelf())
        shelf.exact[pending.digest] = CachedAnswer(
            text=response.text,
            model=response.model,
            verdict="redacted" if response.verdict == "redacted" else "allowed",
            finish_reason=response.finish_reason,
            citations=tuple(response.citations),
            expires_at=now + self.ttl_s,
        )
        shelf.exact.move_to_end(pending.digest)
        shelf.vectors[pending.digest] = pending.vector
        self._evict(shelf, now)
        return True

    def _evict(self, shelf: _Shelf, now: float) -> None:
        for digest in [d for d, a in shelf.exact.items() if a.expires_at <= now]:
            del shelf.exact[digest], shelf.vectors[digest]
        while len(shelf.exact) > self.max_per_scope:
            digest, _ = shelf.exact.popitem(last=False)
            del shelf.vectors[digest]

    def __len__(self) -> int:
        return sum(len(s.exact) for s in self._shelves.values())


def _cacheable(response: Response) -> bool:
    return (
        response.error is None
        and not response.cached
        and response.verdict in ("allowed", "redacted")
        and response.finish_reason in CACHEABLE_FINISH
        and bool(response.text.strip())
        # Quotes and declines answer the exact question asked, not a similar one.
        and response.answer_mode == "generated"
    )


def _unit(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
