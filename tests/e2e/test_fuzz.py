"""Property-based fuzzing of both entrances: the gateway's HTTP API and the request topic.

Thousands of malformed inputs: nothing crashes, every one is answered with a
reason (a 4xx JSON error at the gateway; a DLQ record on the topic), and valid
traffic sent alongside is still answered.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from kllm.runtime.kafka import make_producer
from schemas import DeadLetter, decode
from tests.e2e.conftest import Client
from topics import REQUESTS, RESPONSES

EXAMPLES = 2000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values that break a field whatever else the record holds.
BAD_FIELDS: dict[str, list[Any]] = {
    "request_id": [None, "", 7, "x" * 200, [], {}],
    "prompt": [None, "", "   \n\t", 12, ["hi"], {"a": 1}],
    "tenant": [None, "", "t" * 65, 3.5],
    "max_tokens": [0, -1, 2000, 5000, "many", 1.5],
    "deadline_at": [1.0, 0.0, "soon"],
    "stream": ["maybe", [1], {"x": 1}],
    "metadata": ["flat", [1, 2], {"k": 1}],
}
ENVELOPE_BREAKS: list[dict[str, Any]] = [
    {"schema": "llm.other"},
    {"schema": None},
    {"v": 3},  # 1 and 2 are read
    {"v": "1"},
    {"v": None},
]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _valid_request() -> dict[str, Any]:
    return {
        "schema": "llm.request",
        "v": 1,
        "request_id": f"fz-{uuid.uuid4()}",
        "tenant": "fuzz",
        "prompt": "What is a partition?",
    }


@st.composite
def malformed_records(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "field", "envelope", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "json":
        return orjson.dumps(draw(json_any.filter(lambda v: not isinstance(v, dict))))
    record = _valid_request()
    if kind == "field":
        field = draw(st.sampled_from(sorted(BAD_FIELDS)))
        record[field] = draw(st.sampled_from(BAD_FIELDS[field]))
    elif kind == "envelope":
        record |= draw(st.sampled_from(ENVELOPE_BREAKS))
    else:
        encoded = orjson.dumps(record)
        return encoded[: draw(st.integers(1, len(encoded) - 1))]
    return orjson.dumps(record)


@st.composite
def malformed_bodies(draw: st.DrawFn) -> bytes:
    """Chat completion bodies, each broken in at least one way the gateway must refuse."""
    kind = draw(st.sampled_from(["bytes", "json", "model", "messages", "message", "numbers"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "json":
        return orjson.dumps(draw(json_any.filter(lambda v: not isinstance(v, dict))))
    body: dict[str, Any] = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "What is a partition?"}],
    }
    if kind == "model":
        body["model"] = draw(st.one_of(st.sampled_from([None, "", 5, "no-such-model"]), json_any))
        if body["model"] == "smollm2-135m":
            body["model"] = "no-such-model"
    elif kind == "messages":
        body["messages"] = draw(
            st.sampled_from([None, [], "hello", 3, [[]], [{"role": "system", "content": "x"}]])
        )
    elif kind == "message":
        body["messages"] = [
            draw(
                st.sampled_from(
                    [
                        {"role": "user"},
                        {"role": "user", "content": "   "},
                        {"role": "wizard", "content": "hi"},
                        {"content": "hi"},
                        {"role": "user", "content": 42},
                        {"role": "user", "content": [{"type": "image", "url": "x"}]},
                    ]
                )
            )
        ]
    else:
        field = draw(st.sampled_from(["max_tokens", "max_completion_tokens", "stream"]))
        body[field] = draw(st.sampled_from([0, -3, "lots", [1], {"a": 1}]))
    return orjson.dumps(body)


@pytest.fixture(scope="module")
def gateway_url(pipeline: Supervisor) -> str:
    return f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}"


@pytest.fixture(scope="module")
def fuzz_key(pipeline: Supervisor) -> str:
    return KeyStore(Path(pipeline.env["KLLM_RUN_DIR"]) / "keys.json").create("fuzz")[1]


def _valid_chat(http: httpx.Client, url: str, key: str) -> httpx.Response:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": f"Fuzz control {uuid.uuid4()}: what is a DLQ?"}],
        "max_tokens": 8,
    }
    return http.post(f"{url}/v1/chat/completions", json=body, headers=_auth(key), timeout=120)


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def test_gateway_refuses_malformed_bodies_with_a_reason(gateway_url: str, fuzz_key: str) -> None:
    statuses: dict[int, int] = {}
    with httpx.Client() as http:
        before = _valid_chat(http, gateway_url, fuzz_key)
        assert before.status_code == 200, before.text

        @FUZZ
        @given(body=malformed_bodies())
        def refused(body: bytes) -> None:
            r = http.post(
                f"{gateway_url}/v1/chat/completions",
                content=body,
                headers=_auth(fuzz_key),
                timeout=30,
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert r.json()["error"]["message"], body

        refused()
        after = _valid_chat(http, gateway_url, fuzz_key)
        assert after.status_code == 200, after.text
        assert http.get(f"{gateway_url}/healthz").status_code == 200
    assert sum(statuses.values()) >= EXAMPLES, statuses


def test_request_topic_dead_letters_every_malformed_record(client: Client) -> None:
    dlq = client.tail(REQUESTS.dlq)
    answers = client.tail(RESPONSES)
    producer: Producer = make_producer(client.bootstrap)
    sent: dict[tuple[int, int], bytes] = {}
    failed: list[str] = []

    def delivered(err: object, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            sent[(msg.partition(), msg.offset())] = msg.value()

    try:
        control_before = client.send("What is a consumer group?", tenant="fuzz-control")

        @FUZZ
        @given(value=malformed_records(), keyed=st.booleans())
        def publish(value: bytes, keyed: bool) -> None:
            key = f"fuzz-{uuid.uuid4().hex[:8]}" if keyed else None
            producer.produce(REQUESTS.name, key=key, value=value, on_delivery=delivered)
            producer.poll(0)

        publish()
        producer.flush(30)
        control_after = client.send("What is retention?", tenant="fuzz-control")
        assert not failed and len(sent) >= EXAMPLES

        lettered: dict[tuple[int, int], DeadLetter] = {}
        deadline = time.monotonic() + 180
        for _key, raw in dlq.reader.records(180):
            letter = decode(raw, DeadLetter)
            if letter.source_topic == REQUESTS.name:
                lettered[(letter.partition, letter.offset)] = letter
            if sent.keys() <= lettered.keys() or time.monotonic() > deadline:
                break
        missing = [sent[k][:80] for k in sent.keys() - lettered.keys()]
        assert not missing, f"{len(missing)} malformed records not dead-lettered: {missing[:5]}"
        assert all(lettered[k].reason for k in sent)
        controls = client.responses(answers, {control_before, control_after}, 120)
        assert controls.keys() == {control_before, control_after}
        assert all(r.error is None and r.text for r in controls.values()), controls
    finally:
        dlq.close()
        answers.close()
