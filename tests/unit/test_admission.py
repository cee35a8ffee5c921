from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kllm.core.errors import ConfigError
from processors import Rejected
from processors.admission import (
    Admission,
    Quota,
    estimated_tokens,
    idempotency_parts,
    idempotent_id,
    parse_quotas,
)
from schemas import Request
from tests.unit.conftest import FakeState

MakeRequest = Callable[..., Request]


class Clocked:
    """Admission plus one tenant's state, driven by a single clock."""

    def __init__(self, admission: Admission, state: FakeState | None = None) -> None:
        self.admission = admission
        self.state = state or FakeState()
        self.n = 0

    def admit(self, t: float, request: Request | None = None, **kw: Any) -> None:
        self.state.now = t
        if request is None:
            self.n += 1
            base: dict[str, Any] = {"request_id": f"r{self.n}", "tenant": "acme", "prompt": "hi"}
            base.update(kw)
            request = Request(**base)
        self.admission.admit(request, self.state, t)
        self.admission.accepted(request, self.state, t)  # as ingestion does once all passed


def _refused(c: Clocked, t: float, **kw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        c.admit(t, **kw)
    return info.value


# --- duplicates ---------------------------------------------------------------------------


def test_repeated_request_id_is_a_silent_duplicate(make_request: MakeRequest) -> None:
    c = Clocked(Admission())
    req = make_request(request_id="same")
    c.admit(10.0, req)
    with pytest.raises(Rejected) as info:
        c.admit(11.0, req)
    assert info.value.code == "duplicate_request"
    assert info.value.notify is False
    assert "same" in info.value.reason


def test_distinct_ids_are_not_duplicates(make_request: MakeRequest) -> None:
    c = Clocked(Admission())
    for i in range(5):
        c.admit(10.0 + i, make_request(request_id=f"id-{i}"))
    # Each id is remembered once, at its own time, and each was charged as a request.
    assert {k: v["at"] for k, (v, _) in c.state.data.items() if k.startswith("seen:")} == {
        f"seen:id-{i}": 10.0 + i for i in range(5)
    }
    assert c.state.get("requests:0") == 5
    assert _refused(c, 20.0, request=make_request(request_id="id-3")).code == ("duplicate_request")


def test_an_idempotency_key_reused_with_another_body_is_refused_under_its_own_id(
    make_request: MakeRequest,
) -> None:
    c = Clocked(Admission())
    first = idempotent_id("acme", "k1", "a" * 16)
    other = idempotent_id("acme", "k1", "b" * 16)
    assert first != other and first.startswith("idem-")
    c.admit(10.0, make_request(request_id=first, deadline_at=70.0))
    refused = _refused(c, 11.0, request=make_request(request_id=other, deadline_at=71.0))
    # A caller-facing refusal (422), answered under the second body's id only.
    assert (refused.code, refused.notify) == ("idempotency_mismatch", True)
    # Another tenant's key of the same name is another key.
    c.admit(12.0, make_request(request_id=idempotent_id("globex", "k1", "b" * 16)))


def test_a_repeat_waits_for_the_original_until_its_deadline_then_runs_again(
    make_request: MakeRequest,
) -> None:
    c = Clocked(Admission())
    rid = idempotent_id("acme", "k1", "a" * 16)
    c.admit(10.0, make_request(request_id=rid, deadline_at=70.0))
    # The original may still be answered: the repeat sends nothing, its caller shares it.
    assert _refused(c, 71.0, request=make_request(request_id=rid)).notify is False
    # Past the deadline (and the gateway's grace) the original has ended: run the retry.
    c.admit(73.0, make_request(request_id=rid, deadline_at=133.0))
    assert c.state.get(f"seen:{rid}")["until"] == 133.0
    # A request without a deadline stays a duplicate for the whole dedupe ttl.
    c.admit(74.0, make_request(request_id="no-deadline"))
    assert _refused(c, 5000.0, request=make_request(request_id="no-deadline")).notify is False


def test_a_retry_after_an_error_answer_runs_as_the_next_attempt(
    make_request: MakeRequest,
) -> None:
    c = Clocked(Admission())
    rid = idempotent_id("acme", "k1", "a" * 16)
    c.admit(10.0, make_request(request_id=rid, deadline_at=70.0))
    retry = idempotent_id("acme", "k1", "a" * 16, attempt=2)
    assert idempotency_parts(retry) == (*idempotency_parts(rid)[:2], 2)  # type: ignore[index]
    c.admit(11.0, make_request(request_id=retry, deadline_at=71.0))  # same key, same body
    assert idempotency_parts("idem-nothex") is None and idempotency_parts("chatcmpl-1") is None


def test_duplicate_memory_expires_after_its_ttl(make_request: MakeRequest) -> None:
    c = Clocked(Admission(dedupe_ttl_s=100.0))
    req = make_request(request_id="same")
    c.admit(0.0, req)
    with pytest.raises(Rejected):
        c.admit(99.0, req)
    c.admit(100.5, req)  # forgotten: admitted again


# --- requests per minute --------------------------------------------------------------------


def test_rpm_allows_n_then_refuses_with_retry_after() -> None:
    c = Clocked(Admission(default=Quota(rpm=3)))
    for t in (10.0, 11.0, 12.0):
        c.admit(t)
    exc = _refused(c, 13.0)
    assert exc.code == "quota_exceeded"
    assert exc.notify is True
    assert exc.retry_after_s is not None
    # After the boundary the three count as (1 - g) * 3 with g the fraction of the new
    # minute gone: a fourth fits once g >= 1/3, at t = 80, 67 s from now.
    assert exc.retry_after_s == pytest.approx(67.0)


def test_retry_after_never_below_one_second() -> None:
    c = Clocked(Admission(default=Quota(rpm=2)))
    c.admit(0.5)  # minute 0: one request
    c.admit(119.9)  # minute 1, previous share ~0: fits
    exc = _refused(c, 119.95)  # 1 + 0.0008 * 1 + 1 > 2 for a few milliseconds more
    assert exc.retry_after_s == 1.0


def test_sliding_window_counts_previous_minute_partially() -> None:
    c = Clocked(Admission(default=Quota(rpm=3)))
    for _ in range(3):
        c.admit(59.0)
    # t=61: overlap = 1 - 1/60, used = 3 * 0.983 = 2.95; 2.95 + 1 > 3
    assert _refused(c, 61.0).code == "quota_exceeded"
    # t=119.9: overlap = 1 - 59.9/60 = 0.00167, used = 0.005; room for 2 more
    c.admit(119.9)
    c.admit(119.9)
    # used = 2 + 0.005 -> 3.005 > 3
    assert _refused(c, 119.9).code == "quota_exceeded"


def test_sliding_window_boundary_is_the_formula() -> None:
    # rpm 4, 4 requests in minute 0; in minute 1 a request fits once overlap*4 + 1 <= 4,
    # that is once now % 60 >= 15.
    c = Clocked(Admission(default=Quota(rpm=4)))
    for _ in range(4):
        c.admit(30.0)
    assert _refused(c, 74.0).code == "quota_exceeded"  # overlap 0.7667: 3.07 + 1 > 4
    c.admit(76.0)  # overlap 0.7333: 2.93 + 1 <= 4


def test_two_minutes_later_the_window_is_empty() -> None:
    c = Clocked(Admission(default=Quota(rpm=2)))
    c.admit(10.0)
    c.admit(10.0)
    assert _refused(c, 70.0).code == "quota_exceeded"
    c.admit(130.0)
    c.admit(130.0)


def test_retrying_after_retry_after_s_is_admitted() -> None:
    c = Clocked(Admission(default=Quota(rpm=3)))
    for _ in range(3):
        c.admit(0.5)
    exc = _refused(c, 1.0)
    assert exc.retry_after_s is not None
    c.admit(1.0 + exc.retry_after_s)  # t=60: used = 0 + 1.0 * 3 = 3 -> refused


def test_refused_request_does_not_consume_quota() -> None:
    c = Clocked(Admission(default=Quota(rpm=2)))
    c.admit(1.0)
    c.admit(2.0)
    for _ in range(10):
        _refused(c, 3.0)
    # Next minute at t=90: overlap 0.5 -> used 1 (from the two admitted, not twelve)
    c.admit(90.0)
    assert _refused(c, 90.0).code == "quota_exceeded"


def test_refused_request_id_can_be_retried(make_request: MakeRequest) -> None:
    c = Clocked(Admission(default=Quota(rpm=1)))
    c.admit(1.0)
    req = make_request(request_id="later")
    with pytest.raises(Rejected) as info:
        c.admit(2.0, req)
    assert info.value.code == "quota_exceeded"
    c.admit(125.0, req)  # not remembered as seen when it was refused


# --- tokens per minute ----------------------------------------------------------------------


def test_estimated_tokens(make_request: MakeRequest) -> None:
    assert estimated_tokens(make_request(prompt="x" * 10, max_tokens=5), 64) == 3 + 5
    assert estimated_tokens(make_request(prompt="x" * 8), 64) == 2 + 64
    assert estimated_tokens(make_request(prompt="x"), 7) == 1 + 7


def test_tpm_limit_with_estimated_tokens() -> None:
    # each request: ceil(8 / 4) + 8 = 10 tokens
    c = Clocked(Admission(default=Quota(tpm=35)))
    for t in (1.0, 2.0, 3.0):
        c.admit(t, prompt="x" * 8, max_tokens=8)
    exc = _refused(c, 4.0, prompt="x" * 8, max_tokens=8)
    assert exc.code == "quota_exceeded"
    assert "tokens" in exc.reason
    c.admit(5.0, prompt="x" * 4, max_tokens=4)  # 1 + 4 = 5 fits exactly: 30 + 5 = 35


def test_tpm_uses_default_max_tokens_when_unset() -> None:
    c = Clocked(Admission(default=Quota(tpm=100), default_max_tokens=60))
    c.admit(1.0, prompt="abcd")  # 1 + 60 = 61
    assert _refused(c, 2.0, prompt="abcd").code == "quota_exceeded"  # 61 + 61 > 100
    c.admit(3.0, prompt="abcd", max_tokens=30)  # 61 + 31 <= 100


def test_request_larger_than_tpm_is_invalid_not_retryable() -> None:
    c = Clocked(Admission(default=Quota(tpm=50)))
    exc = _refused(c, 1.0, prompt="x" * 40, max_tokens=41)  # 10 + 41 = 51
    assert exc.code == "invalid_request"
    assert exc.retry_after_s is None
    assert "51" in exc.reason
    c.admit(2.0, prompt="x" * 40, max_tokens=40)  # 50: nothing was charged


def test_tokens_refusal_does_not_charge_requests() -> None:
    c = Clocked(Admission(default=Quota(rpm=2, tpm=20)))
    c.admit(1.0, prompt="abcd", max_tokens=15)  # 16 tokens
    assert _refused(c, 2.0, prompt="abcd", max_tokens=15).code == "quota_exceeded"
    c.admit(3.0, prompt="abcd", max_tokens=3)  # the refused one did not count as a request


# --- per tenant -----------------------------------------------------------------------------


def test_per_tenant_quota_overrides_default() -> None:
    admission = Admission(default=Quota(rpm=1), per_tenant={"big": Quota(rpm=3)})
    assert admission.quota_for("big") == Quota(rpm=3)
    assert admission.quota_for("other") == Quota(rpm=1)
    big = Clocked(admission)
    for _ in range(3):
        big.admit(1.0, tenant="big")
    assert _refused(big, 1.0, tenant="big").code == "quota_exceeded"
    small = Clocked(admission)
    small.admit(1.0, tenant="small")
    assert _refused(small, 1.0, tenant="small").code == "quota_exceeded"


def test_per_tenant_unlimited_override() -> None:
    admission = Admission(default=Quota(rpm=1), per_tenant={"vip": Quota()})
    assert admission.quota_for("vip") == Quota()
    c = Clocked(admission)
    for _ in range(50):
        c.admit(1.0, tenant="vip")
    assert c.state.get("requests:0") == 50  # all fifty admitted and counted
    # The default still holds for everyone else: a second request in the minute is refused.
    other = Clocked(admission)
    other.admit(1.0, tenant="other")
    assert _refused(other, 1.0, tenant="other").code == "quota_exceeded"


def test_tenants_with_separate_states_do_not_share_counters() -> None:
    admission = Admission(default=Quota(rpm=2))
    a, b = Clocked(admission), Clocked(admission)
    a.admit(1.0, tenant="a")
    a.admit(1.0, tenant="a")
    b.admit(1.0, tenant="b")
    b.admit(1.0, tenant="b")
    assert _refused(a, 1.0, tenant="a").code == "quota_exceeded"
    assert _refused(b, 1.0, tenant="b").code == "quota_exceeded"


def test_no_quota_means_unlimited() -> None:
    admission = Admission()
    assert admission.quota_for("acme") == Quota(rpm=None, tpm=None)
    c = Clocked(admission)
    for _ in range(200):
        c.admit(1.0, prompt="x" * 4000, max_tokens=4096)
    # All admitted, and counted (1000 prompt + 4096 completion tokens each) with no limit.
    assert c.state.get("requests:0") == 200
    assert c.state.get("tokens:0") == 200 * (1000 + 4096)


# --- configuration --------------------------------------------------------------------------


def test_parse_quotas() -> None:
    quotas = parse_quotas({"acme": {"rpm": 60, "tpm": 20000}, "b": {"tpm": 5}, "c": {}})
    assert quotas == {"acme": Quota(60, 20000), "b": Quota(tpm=5), "c": Quota()}


def test_parse_quotas_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"acme.*rps"):
        parse_quotas({"acme": {"rps": 5}})


@pytest.mark.parametrize("kw", [{"rpm": 0}, {"rpm": -1}, {"tpm": 0}])
def test_quota_rejects_values_below_one(kw: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kw))):
        Quota(**kw)


def test_parse_quotas_reports_bad_values() -> None:
    with pytest.raises(ConfigError):
        parse_quotas({"acme": {"rpm": 0}})
