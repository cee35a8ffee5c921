from __future__ import annotations

import math
import pickle
from typing import Any

import pytest

from processors.cache import ResponseCache
from schemas import Citation, Request, Response, ResponseFormat, Sampling, Tool, Usage
from schemas.chat import ChatTurn, FunctionSpec, NamedFunction, NamedToolChoice

NOW = 1000.0
E1 = [1.0, 0.0, 0.0, 0.0]
E2 = [0.0, 1.0, 0.0, 0.0]


def at_angle(cos: float) -> list[float]:
    """A unit vector whose cosine with E1 is ``cos``."""
    return [cos, math.sqrt(1.0 - cos * cos), 0.0, 0.0]


def req(**kw: Any) -> Request:
    base: dict[str, Any] = {
        "request_id": "r1",
        "tenant": "acme",
        "prompt": "What is Kafka?",
        "model": "m1",
        "template": "rag@v2/a",
    }
    base.update(kw)
    if "messages" in kw:
        del base["prompt"]
    return Request(**base)


def resp(**kw: Any) -> Response:
    base: dict[str, Any] = {
        "request_id": "r1",
        "tenant": "acme",
        "text": "Kafka is a distributed log [1].",
        "verdict": "allowed",
        "model": "m1",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=10, completion_tokens=5),
        "citations": [Citation(chunk_id="c1", doc_id="d1", score=0.9)],
    }
    base.update(kw)
    return Response(**base)


def learned(
    cache: ResponseCache, request: Request, vector: list[float] = E1, now: float = NOW, **kw: Any
) -> bool:
    cache.expect(request, vector, now)
    return cache.learn_one(resp(request_id=request.request_id, **kw), now)


# --- exact ----------------------------------------------------------------------------------


def test_miss_then_learn_then_exact_hit() -> None:
    cache = ResponseCache()
    r = req()
    assert cache.lookup_exact(r, NOW) is None
    assert cache.lookup_similar(r, E1, NOW) is None
    cache.expect(r, E1, NOW)
    assert cache.lookup_exact(r, NOW) is None  # expected, not yet answered
    assert cache.learn_one(resp(), NOW + 1) is True
    assert len(cache) == 1
    hit = cache.lookup_exact(req(request_id="r2"), NOW + 2)
    assert hit is not None
    assert hit.kind == "exact"
    assert hit.similarity == 1.0
    assert hit.answer.text == "Kafka is a distributed log [1]."
    assert hit.answer.model == "m1"
    assert hit.answer.verdict == "allowed"
    assert hit.answer.finish_reason == "stop"
    assert hit.answer.citations == (Citation(chunk_id="c1", doc_id="d1", score=0.9),)


def test_exact_hit_ignores_case_and_whitespace() -> None:
    cache = ResponseCache()
    assert learned(cache, req(prompt="What is Kafka?"))
    hit = cache.lookup_exact(req(request_id="r2", prompt="  what   IS\nkafka? "), NOW)
    assert hit is not None and hit.kind == "exact"
    assert cache.lookup_exact(req(request_id="r3", prompt="What is Kafka!"), NOW) is None


def test_redacted_answer_is_kept_with_its_verdict() -> None:
    cache = ResponseCache()
    assert learned(cache, req(), verdict="redacted")
    hit = cache.lookup_exact(req(), NOW)
    assert hit is not None and hit.answer.verdict == "redacted"


def test_length_finish_is_cacheable() -> None:
    cache = ResponseCache()
    assert learned(cache, req(), finish_reason="length")


# --- semantic -------------------------------------------------------------------------------


def test_semantic_hit_above_threshold() -> None:
    cache = ResponseCache(similarity=0.9)
    assert learned(cache, req(), E1)
    other = req(request_id="r2", prompt="Tell me what Kafka is")
    assert cache.lookup_exact(other, NOW) is None
    hit = cache.lookup_similar(other, at_angle(0.95), NOW)
    assert hit is not None
    assert hit.kind == "semantic"
    assert hit.similarity == pytest.approx(0.95, abs=1e-5)
    assert hit.answer.text == "Kafka is a distributed log [1]."


def test_semantic_miss_below_threshold() -> None:
    cache = ResponseCache(similarity=0.9)
    assert learned(cache, req(), E1)
    assert cache.lookup_similar(req(request_id="r2", prompt="x"), at_angle(0.85), NOW) is None
    assert cache.lookup_similar(req(request_id="r2", prompt="x"), E2, NOW) is None


def test_semantic_vectors_are_normalised() -> None:
    cache = ResponseCache(similarity=0.9)
    assert learned(cache, req(), [5.0, 0.0, 0.0, 0.0])
    hit = cache.lookup_similar(
        req(request_id="r2", prompt="x"), [c * 7 for c in at_angle(0.95)], NOW
    )
    assert hit is not None
    assert hit.similarity == pytest.approx(0.95, abs=1e-5)


def test_semantic_picks_the_closest_entry() -> None:
    cache = ResponseCache(similarity=0.5)
    assert learned(cache, req(request_id="a", prompt="first"), E1, text="about E1")
    assert learned(cache, req(request_id="b", prompt="second"), E2, text="about E2")
    hit = cache.lookup_similar(req(request_id="q", prompt="q"), [0.2, 0.98, 0.0, 0.0], NOW)
    assert hit is not None and hit.answer.text == "about E2"


# --- scoping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change", [{"tenant": "other"}, {"model": "m2"}, {"model": None}, {"template": "rag@v2/b"}]
)
def test_entries_are_scoped(change: dict[str, Any]) -> None:
    cache = ResponseCache(similarity=0.5)
    assert learned(cache, req(), E1)
    other = req(request_id="r2", **change)
    assert cache.lookup_exact(other, NOW) is None
    assert cache.lookup_similar(other, E1, NOW) is None
    assert cache.lookup_exact(req(request_id="r3"), NOW) is not None  # same scope still hits


# --- expiry ---------------------------------------------------------------------------------


def test_ttl_expiry() -> None:
    cache = ResponseCache(ttl_s=60.0)
    assert learned(cache, req(), E1, now=NOW)
    assert cache.lookup_exact(req(), NOW + 59.9) is not None
    assert cache.lookup_similar(req(), E1, NOW + 59.9) is not None
    assert cache.lookup_exact(req(), NOW + 60.0) is None
    assert cache.lookup_similar(req(), E1, NOW + 60.0) is None


def test_expired_entries_are_dropped_on_learn() -> None:
    cache = ResponseCache(ttl_s=60.0)
    assert learned(cache, req(request_id="a", prompt="one"), now=NOW)
    assert learned(cache, req(request_id="b", prompt="two"), now=NOW + 100)
    assert len(cache) == 1


# --- what is stored -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"error": "engine failed", "error_code": "engine_error"},
        {"verdict": "blocked"},
        {"finish_reason": "timeout"},
        {"finish_reason": "error"},
        {"cached": True},
        {"text": ""},
        {"text": "   \n"},
    ],
)
def test_only_clean_answers_are_stored(bad: dict[str, Any]) -> None:
    cache = ResponseCache()
    assert learned(cache, req(), E1, **bad) is False
    assert len(cache) == 0
    assert cache.lookup_exact(req(), NOW) is None
    assert cache.lookup_similar(req(), E1, NOW) is None


def test_learn_of_unexpected_request_stores_nothing() -> None:
    cache = ResponseCache()
    cache.expect(req(request_id="expected"), E1, NOW)
    assert cache.learn_one(resp(request_id="surprise"), NOW) is False
    assert len(cache) == 0
    assert cache.lookup_exact(req(), NOW) is None


def test_learn_one_consumes_the_pending_entry() -> None:
    cache = ResponseCache()
    cache.expect(req(), E1, NOW)
    assert cache.learn_one(resp(text="first"), NOW) is True
    assert cache.learn_one(resp(text="second"), NOW) is False
    hit = cache.lookup_exact(req(), NOW)
    assert hit is not None and hit.answer.text == "first"


# --- bounds ---------------------------------------------------------------------------------


def test_max_per_scope_evicts_oldest() -> None:
    cache = ResponseCache(max_per_scope=2, similarity=0.99)
    vectors = [E1, E2, [0.0, 0.0, 1.0, 0.0]]
    for i, v in enumerate(vectors):
        assert learned(cache, req(request_id=f"r{i}", prompt=f"question {i}"), v, text=f"a{i}")
    assert len(cache) == 2
    assert cache.lookup_exact(req(request_id="q", prompt="question 0"), NOW) is None
    assert cache.lookup_similar(req(request_id="q", prompt="q"), E1, NOW) is None
    for i in (1, 2):
        hit = cache.lookup_exact(req(request_id="q", prompt=f"question {i}"), NOW)
        assert hit is not None and hit.answer.text == f"a{i}"
    # another scope has its own budget
    assert learned(cache, req(request_id="t", tenant="other", prompt="question 0"))
    assert len(cache) == 3


def test_max_pending_bounds_the_pending_map() -> None:
    cache = ResponseCache(max_pending=2)
    for i in range(3):
        cache.expect(req(request_id=f"r{i}", prompt=f"question {i}"), E1, NOW + i)
    assert cache.learn_one(resp(request_id="r0"), NOW) is False  # oldest was dropped
    assert cache.learn_one(resp(request_id="r1"), NOW) is True
    assert cache.learn_one(resp(request_id="r2"), NOW) is True


# --- persistence ----------------------------------------------------------------------------


def test_pickle_round_trip_keeps_entries_and_pending() -> None:
    cache = ResponseCache(similarity=0.9, ttl_s=60.0)
    assert learned(cache, req(), E1)
    cache.expect(req(request_id="waiting", prompt="another"), E2, NOW)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 1
    hit = copy.lookup_exact(req(request_id="r9"), NOW + 1)
    assert hit is not None and hit.answer.text == "Kafka is a distributed log [1]."
    similar = copy.lookup_similar(req(request_id="r9", prompt="x"), at_angle(0.95), NOW + 1)
    assert similar is not None and similar.kind == "semantic"
    assert copy.learn_one(resp(request_id="waiting", text="later"), NOW + 2) is True
    assert copy.lookup_exact(req(prompt="ANOTHER"), NOW + 2) is not None
    assert copy.lookup_exact(req(), NOW + 61) is None  # its ttl survived too


# --- corpus changes -------------------------------------------------------------------------


def test_a_tenants_document_change_drops_its_answers_only() -> None:
    cache = ResponseCache()
    assert learned(cache, req(request_id="a", tenant="acme"))
    assert learned(cache, req(request_id="b", tenant="other"))
    assert cache.invalidate("acme") == 1
    assert cache.lookup_exact(req(tenant="acme"), NOW) is None
    assert cache.lookup_exact(req(tenant="other"), NOW) is not None


def test_a_public_document_change_drops_every_tenants_answers() -> None:
    cache = ResponseCache()
    assert learned(cache, req(request_id="a", tenant="acme"))
    assert learned(cache, req(request_id="b", tenant="other"))
    assert cache.invalidate("public", everyone=True) == 2
    assert len(cache) == 0


def test_an_answer_asked_before_a_change_is_not_stored_after_it() -> None:
    cache = ResponseCache()
    request = req(request_id="late", tenant="acme")
    cache.expect(request, E1, NOW)
    cache.invalidate("acme")  # the document it may cite changed while it was generated
    assert cache.learn_one(resp(request_id="late"), NOW) is False
    assert cache.lookup_exact(request, NOW) is None
    again = req(request_id="next", tenant="acme")
    assert learned(cache, again)  # asked after the change: stored
    other = req(request_id="o", tenant="other")
    cache.expect(other, E1, NOW)
    cache.invalidate("public", everyone=True)
    assert cache.learn_one(resp(request_id="o", tenant="other"), NOW) is False


def test_learn_batch_stores_the_expected_answers_and_publishes_nothing() -> None:
    cache = ResponseCache()
    cache.expect(req(request_id="a", tenant="acme"), E1, NOW)
    out = cache.learn_batch([resp(request_id="a", tenant="acme"), resp(request_id="x")], NOW)
    assert out == []
    assert len(cache) == 1
    assert cache.lookup_exact(req(tenant="acme"), NOW) is not None


# --- what else shapes an answer -------------------------------------------------------------


def _learned_then(ask: Request, **learn: Any) -> bool:
    """Whether ``ask`` is served the answer learned for ``learn``'s request."""
    cache = ResponseCache()
    assert learned(cache, req(**learn))
    return cache.lookup_exact(ask, NOW + 1) is not None


def test_a_greedy_or_seeded_request_is_served() -> None:
    assert _learned_then(req(request_id="r2"))
    seeded = Sampling(temperature=1.0, seed=7)
    assert _learned_then(req(request_id="r2", sampling=seeded), sampling=seeded)


def test_a_random_request_is_neither_served_nor_stored() -> None:
    random = Sampling(temperature=1.0)
    assert not _learned_then(req(request_id="r2", sampling=random))
    cache = ResponseCache()
    assert not learned(cache, req(sampling=random))
    assert len(cache) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 128},
        {"sampling": Sampling(stop=["."])},
        {"sampling": Sampling(top_p=0.5)},
        {"response_format": ResponseFormat(type="json_object")},
        {"tools": [Tool(function=FunctionSpec(name="weather"))]},
        {
            "tools": [Tool(function=FunctionSpec(name="weather"))],
            "tool_choice": NamedToolChoice(function=NamedFunction(name="weather")),
        },
        {
            "messages": [
                ChatTurn(role="system", content="Answer in French."),
                ChatTurn(role="user", content="What is Kafka?"),
            ]
        },
        {
            "messages": [
                ChatTurn(role="user", content="Tell me about logs."),
                ChatTurn(role="assistant", content="Logs are ..."),
                ChatTurn(role="user", content="What is Kafka?"),
            ]
        },
    ],
    ids=["max_tokens", "stop", "top_p", "json", "tools", "named", "instructions", "history"],
)
def test_the_same_question_asked_differently_is_a_miss(change: dict[str, Any]) -> None:
    assert not _learned_then(req(request_id="r2", **change))
    assert not _learned_then(req(request_id="r2"), **change)
    assert _learned_then(req(request_id="r2", **change), **change)


def test_a_truncated_answer_is_not_served_to_a_caller_asking_for_more() -> None:
    cache = ResponseCache()
    assert learned(cache, req(max_tokens=8), finish_reason="length")
    assert cache.lookup_exact(req(request_id="r2", max_tokens=8), NOW + 1) is not None
    assert cache.lookup_exact(req(request_id="r3", max_tokens=64), NOW + 1) is None


def test_a_fallback_answer_is_kept_under_its_own_model() -> None:
    cache = ResponseCache()
    assert learned(cache, req(), model="fallback-m", fallback=True)
    assert cache.lookup_exact(req(request_id="r2"), NOW + 1) is None
    hit = cache.lookup_exact(req(request_id="r3", model="fallback-m"), NOW + 1)
    assert hit is not None and hit.answer.model == "fallback-m"


@pytest.mark.parametrize("mode", ["quoted", "declined"])
def test_quoted_and_declined_answers_are_not_cached(mode: str) -> None:
    # They answer the exact question asked from its passages, not a similar one.
    assert learned(ResponseCache(), req(), answer_mode=mode) is False
