"""Admission at ingestion: a request id is answered once, and tenants stay within quota.

Both need memory per tenant. The request topic is keyed by tenant, so every
request of a tenant reaches the same partition and so the same ingestion
consumer, whatever the number of consumers: that consumer's keyed state (the
stage runtime's state store, scoped to the record's key) is the tenant's one
counter. Quotas are a sliding window over the last minute, estimated from the
current and previous one-minute buckets.

Idempotency keys: the gateway names a request carrying an Idempotency-Key
``idem-<key hash><body hash>[.<attempt>]`` (:func:`idempotent_id`), the same on
every replica. Ingestion remembers, per key, the body it was first accepted with:
the key reused with another body is refused (``idempotency_mismatch``, its own
request id, so the original's callers never see that refusal). A repeat of an
accepted id sends nothing while the original may still be answered (its callers,
on any replica, get that answer); once the original's deadline has passed it has
ended one way or the other, and the repeat runs again rather than wait for an
answer that is not coming. A retry after an error answer, which every replica
saw, takes the next attempt number, so it runs at once.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from kllm.core.errors import ConfigError
from processors.base import Rejected
from schemas import Request

WINDOW_S = 60.0
DEADLINE_GRACE_S = 2.0
"""After the original's deadline the gateway waits about a second more for its answer."""
_IDEM = re.compile(r"idem-([0-9a-f]{32})([0-9a-f]{16})(?:\.([1-9][0-9]{0,3}))?")


def idempotent_id(tenant: str, key: str, body_hash: str, attempt: int = 1) -> str:
    """The request id of a request carrying ``key`` (scoped by tenant: two tenants' keys
    never name the same request) and a body whose canonical form hashes to ``body_hash``."""
    scoped = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:32]
    rid = f"idem-{scoped}{body_hash[:16]}"
    return rid if attempt == 1 else f"{rid}.{attempt}"


def idempotency_parts(request_id: str) -> tuple[str, str, int] | None:
    """(key hash, body hash, attempt) of an id made by :func:`idempotent_id`, else None."""
    match = _IDEM.fullmatch(request_id)
    if match is None:
        return None
    return match.group(1), match.group(2), int(match.group(3) or 1)


class KeyedState(Protocol):
    """State scoped to the current record's key (the tenant)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any, ttl: timedelta | None = None) -> None: ...


@dataclass(frozen=True)
class Quota:
    """Requests and tokens per minute; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and value < 1:
                raise ConfigError(f"quota {name} must be at least 1 (or unset), got {value}")


def parse_quotas(raw: Mapping[str, Mapping[str, int | None]]) -> dict[str, Quota]:
    """{"acme": {"rpm": 60, "tpm": 20000}} -> per-tenant quotas, with clear errors."""
    out: dict[str, Quota] = {}
    for tenant, spec in raw.items():
        unknown = set(spec) - {"rpm", "tpm"}
        if unknown:
            raise ConfigError(
                f"quota for {tenant!r}: unknown keys {sorted(unknown)} (use rpm, tpm)"
            )
        out[tenant] = Quota(rpm=spec.get("rpm"), tpm=spec.get("tpm"))
    return out


def estimated_tokens(request: Request, default_max_tokens: int) -> int:
    """Tokens a request may cost, known before it runs: about four characters per prompt
    token, plus the completion it may generate."""
    return math.ceil(len(request.prompt) / 4) + (request.max_tokens or default_max_tokens)


def retry_after(now: float, current: float, previous: float, cost: float, limit: float) -> float:
    """Seconds until ``current + overlap * previous + cost <= limit`` holds, as the window
    slides and no other request is admitted meanwhile."""
    into = now % WINDOW_S
    room = limit - cost - current
    if previous > 0 and room >= 0:
        # Still in this minute: wait for the previous minute's share to shrink enough.
        wait = (1.0 - room / previous) * WINDOW_S - into
    else:
        # After the boundary this minute becomes the previous one, and shrinks in turn.
        wait = WINDOW_S - into + max(0.0, 1.0 - (limit - cost) / current) * WINDOW_S
    return float(math.ceil(max(1.0, wait)))


@dataclass
class Admission:
    """Checks one request against the tenant's state; raises Rejected to refuse it."""

    default: Quota = field(default_factory=Quota)
    per_tenant: Mapping[str, Quota] = field(default_factory=dict)
    dedupe_ttl_s: float = 24 * 3600.0
    default_max_tokens: int = 64

    def quota_for(self, tenant: str) -> Quota:
        return self.per_tenant.get(tenant, self.default)

    def admit(self, request: Request, state: KeyedState, now: float) -> None:
        """Refuse an Idempotency-Key reused with another body, a request id already
        accepted and maybe still being answered, or one over quota; else charge the quota."""
        parts = idempotency_parts(request.request_id)
        if parts is not None:
            used = state.get(f"idem:{parts[0]}")
            if used is not None and used != parts[1]:
                raise Rejected(
                    "this Idempotency-Key was already used with a different request body",
                    code="idempotency_mismatch",
                )
        if _in_flight(state.get(f"seen:{request.request_id}"), now):
            raise Rejected(
                f"duplicate request id {request.request_id!r}: already accepted, answered once",
                code="duplicate_request",
                notify=False,
            )
        self._charge(request, state, now)

    def accepted(self, request: Request, state: KeyedState, now: float) -> None:
        """Remember the id once the request passed every check, so a retry of one that
        failed on the way (a screening model's hiccup) is not taken for a duplicate."""
        ttl = timedelta(seconds=self.dedupe_ttl_s)
        seen = {"at": now, "until": request.deadline_at}
        state.set(f"seen:{request.request_id}", seen, ttl=ttl)
        parts = idempotency_parts(request.request_id)
        if parts is not None:
            state.set(f"idem:{parts[0]}", parts[1], ttl=ttl)

    def _charge(self, request: Request, state: KeyedState, now: float) -> None:
        quota = self.quota_for(request.tenant)
        minute = int(now // WINDOW_S)
        # Share of the previous bucket still inside the sliding window.
        overlap = 1.0 - (now % WINDOW_S) / WINDOW_S
        tokens = estimated_tokens(request, self.default_max_tokens)
        for name, limit, cost in (("requests", quota.rpm, 1), ("tokens", quota.tpm, tokens)):
            if limit is None:
                continue
            if cost > limit:
                raise Rejected(
                    f"the request may use {cost} {name}, more than tenant "
                    f"{request.tenant!r}'s quota of {limit} per minute"
                )
            current = state.get(f"{name}:{minute}", 0)
            previous = state.get(f"{name}:{minute - 1}", 0)
            if current + overlap * previous + cost > limit:
                raise Rejected(
                    f"tenant {request.tenant!r} is over its quota of {limit} {name} per minute",
                    code="quota_exceeded",
                    retry_after_s=retry_after(now, current, previous, cost, limit),
                )
        ttl = timedelta(seconds=2 * WINDOW_S)
        for name, cost in (("requests", 1), ("tokens", tokens)):
            state.set(f"{name}:{minute}", state.get(f"{name}:{minute}", 0) + cost, ttl=ttl)


def _in_flight(seen: Any, now: float) -> bool:
    """Whether an accepted request (its ``seen`` record) may still be answered. One
    without a deadline, or remembered by an older version (a bare timestamp), may."""
    if seen is None:
        return False
    until = seen.get("until") if isinstance(seen, dict) else None
    return until is None or now <= float(until) + DEADLINE_GRACE_S
