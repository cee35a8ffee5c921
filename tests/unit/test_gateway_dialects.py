"""The gateway's OpenAI surface beyond plain chat: the whole conversation published as a
v2 record, ignored fields named, refused fields, legacy text completions, the models
and their pools. A fake producer and reply router, as in test_gateway; no Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from kllm.gateway.routes import make_app
from processors import text_completions
from schemas import Request, decode
from tests.unit.test_gateway import Rig, auth, chat, make_rig
from topics import REQUESTS


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path, model_pools={"smollm2-135m": "cpu"})


def _published(rig: Rig) -> Request:
    (topic, _key, value, _headers) = rig.producer.produced[0]
    assert topic == REQUESTS.name
    assert orjson.loads(value)["v"] == 2
    return decode(value, Request)


def test_the_conversation_and_sampling_are_published(rig: Rig) -> None:
    body = chat() | {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is Kafka?"},
            {"role": "assistant", "content": "A log."},
            {"role": "user", "content": "And a topic?"},
        ],
        "temperature": 0.5,
        "seed": 11,
        "stop": "\n",
        "response_format": {"type": "json_object"},
    }
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/chat/completions", json=body, headers=auth(rig.secret))
    assert r.status_code == 200, r.text
    assert "x-kllm-ignored" not in r.headers
    request = _published(rig)
    assert [t.role for t in request.messages] == ["system", "user", "assistant", "user"]
    assert request.prompt == "And a topic?"
    assert (request.sampling.temperature, request.sampling.seed) == (0.5, 11)
    assert request.sampling.stop == ["\n"]
    assert request.response_format is not None and request.response_format.json_mode()


def test_unknown_fields_are_named_in_a_header(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.post(
            "/v1/chat/completions",
            json=chat() | {"colour": "red", "service_tier": "auto"},
            headers=auth(rig.secret),
        )
    assert r.status_code == 200
    assert r.headers["x-kllm-ignored"] == "colour, service_tier"


def test_a_field_no_engine_can_honour_is_400_and_never_published(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.post(
            "/v1/chat/completions", json=chat() | {"logit_bias": {"7": 1}}, headers=auth(rig.secret)
        )
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("logit_bias:")
    assert REQUESTS.name not in rig.producer.topics()


def test_legacy_completions_take_the_chat_path(rig: Rig) -> None:
    body = {"model": "smollm2-135m", "prompt": "What is Kafka?", "temperature": 0}
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/completions", json=body, headers=auth(rig.secret))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "text_completion"
    assert got["choices"] == [
        {"index": 0, "text": "Kafka is a log.", "logprobs": None, "finish_reason": "stop"}
    ]
    request = _published(rig)
    assert request.prompt == "What is Kafka?"
    assert request.max_tokens == text_completions.LEGACY_DEFAULT_MAX_TOKENS


def test_legacy_completions_stream_text_chunks(rig: Rig) -> None:
    body = {"model": "smollm2-135m", "prompt": ["What is Kafka?"], "stream": True}
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/completions", json=body, headers=auth(rig.secret))
    events = [orjson.loads(line[5:]) for line in r.text.splitlines() if line[5:].strip()[:1] == "{"]
    assert {e["object"] for e in events} == {"text_completion"}
    assert "".join(c["text"] for e in events for c in e["choices"]) == "Kafka is a log."


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": "  "}, "prompt"),
    ],
)
def test_legacy_fields_that_cannot_be_honoured_are_400(
    rig: Rig, change: dict[str, Any], field: str
) -> None:
    body = {"model": "smollm2-135m", "prompt": "What is Kafka?"} | change
    with TestClient(make_app(rig.gw)) as client:
        r = client.post("/v1/completions", json=body, headers=auth(rig.secret))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{field}:")


def test_models_name_their_pool(rig: Rig) -> None:
    with TestClient(make_app(rig.gw)) as client:
        r = client.get("/v1/models", headers=auth(rig.secret))
    assert [(m["id"], m["kllm"]["pool"]) for m in r.json()["data"]] == [("smollm2-135m", "cpu")]
