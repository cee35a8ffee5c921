"""Conversations through the real gateway and pipeline, with the official `openai`
client and the real xllamacpp engine (SmolLM2): history, the caller's system
prompt, JSON mode, stop, seed, fields refused by name, records from a producer
written in another language, and follow-up questions."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from jsonschema import Draft202012Validator

from kllm.ops.supervisor import Supervisor
from schemas import Document, InferenceJob, decode
from tests import needs
from tests.e2e.conftest import Client, Replies, collect
from tests.e2e.test_gateway import TIMEOUT, Gateway
from tests.e2e.test_live_corpus import publish, receipt
from topics import DOCUMENTS_INDEXED, INFERENCE, REQUESTS, RESPONSES

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def gateway(pipeline: Supervisor) -> Gateway:
    return Gateway.of(pipeline)


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key("conv"), timeout=TIMEOUT)


@pytest.fixture()
def jobs(client: Client) -> Iterator[Replies]:
    reader = client.tail(INFERENCE)
    yield reader
    reader.close()


def _ask(oai: openai.OpenAI, messages: list[dict[str, str]], **fields: Any) -> Any:
    fields.setdefault("max_tokens", 24)
    return oai.chat.completions.create(model=MODEL, messages=messages, **fields)  # type: ignore[call-overload]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _text(done: Any) -> str:
    return str(done.choices[0].message.content or "")


def test_the_model_answers_from_an_earlier_turn(oai: openai.OpenAI) -> None:
    word = "PELICAN"
    done = _ask(
        oai,
        [
            _user(f"Remember this code word: {word}."),
            {"role": "assistant", "content": f"Understood. The code word is {word}."},
            _user("What is the code word? Answer with the word only."),
        ],
    )
    assert word in _text(done).upper(), _text(done)


def test_a_client_system_message_changes_the_answer(oai: openai.OpenAI) -> None:
    question = _user("What is the name of the secret project? Answer with the name only.")
    told = _ask(
        oai, [{"role": "system", "content": "The secret project is named KESTREL."}, question]
    )
    assert "KESTREL" in _text(told).upper(), _text(told)
    assert "KESTREL" not in _text(_ask(oai, [question])).upper()
    assert told.model_extra["kllm"]["instructions_dropped"] == 0


@pytest.mark.slow
def test_json_mode_always_returns_json(oai: openai.OpenAI) -> None:
    topics = ["Kafka", "a topic", "a partition", "an offset", "a consumer group"]
    answers = [
        _ask(
            oai,
            [_user(f'Give a JSON object {{"name": ..., "short": ...}} for {topic}. ({i})')],
            response_format={"type": "json_object"},
            max_tokens=160,
        ).choices[0]
        for i in range(4)
        for topic in topics
    ]
    assert len(answers) == 20
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        try:
            value = json.loads(choice.message.content)
        except ValueError as exc:
            raise AssertionError(f"not JSON: {choice.message.content!r}") from exc
        assert isinstance(value, dict), value


@pytest.mark.slow
def test_a_json_schema_is_obeyed(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "stage": {"type": "string", "enum": ["ingestion", "retrieval", "inference"]},
            "consumers": {"type": "integer", "minimum": 1, "maximum": 64},
        },
        "required": ["stage", "consumers"],
        "additionalProperties": False,
    }
    validator = Draft202012Validator(schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "scaling", "schema": schema}}
    for i in range(5):
        answer = _text(
            _ask(
                oai,
                [_user(f"Which stage should I scale, and to how many consumers? ({i})")],
                response_format=fmt,
                max_tokens=64,
            )
        )
        validator.validate(json.loads(answer))


def test_n_gives_several_choices(oai: openai.OpenAI) -> None:
    done = _ask(oai, [_user("Name a Kafka concept.")], n=2, temperature=1.0, seed=3, max_tokens=12)
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.message.content for c in done.choices)
    assert done.choices[0].message.content != done.choices[1].message.content


def test_logprobs_come_back_when_asked_for(oai: openai.OpenAI) -> None:
    done = _ask(oai, [_user("Say yes.")], logprobs=True, top_logprobs=2, max_tokens=4)
    content = done.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == _text(done)
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert _ask(oai, [_user("Say yes.")], max_tokens=4).choices[0].logprobs is None


def test_stop_is_honoured(oai: openai.OpenAI) -> None:
    messages = [_user("Name three parts of the pipeline.")]
    plain = _text(_ask(oai, messages, max_tokens=32))
    assert len(plain.split()) >= 4, plain
    done = _ask(oai, messages, stop=[" "], max_tokens=32)  # stops at the first space
    assert done.choices[0].finish_reason == "stop"
    assert _text(done).strip() and " " not in _text(done), _text(done)


def test_a_seed_repeats_an_answer_at_temperature_one(gateway: Gateway) -> None:
    # Each call from its own tenant: the response cache is per tenant, so every answer
    # here comes from the engine, none from the cache. A request's template variant
    # follows from its id: answers are compared within one variant.
    def sampled(seed: int) -> tuple[str, str]:
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=gateway.key(f"seed-{uuid.uuid4().hex[:6]}")
        )
        done = _ask(
            client,
            [_user("Write a one-line poem about logs.")],
            temperature=1.0,
            seed=seed,
            max_tokens=20,
        )
        ext = done.model_extra["kllm"]
        assert not ext["cached"]
        return ext["template"], _text(done)

    answers: dict[tuple[str, int], list[str]] = {}

    def comparable() -> list[str]:
        """Variants with two answers to seed 7 and one to seed 8."""
        return [t for t, _ in answers if len(answers.get((t, 7), [])) >= 2 and (t, 8) in answers]

    for _ in range(8):
        for seed in (7, 8):
            template, text = sampled(seed)
            answers.setdefault((template, seed), []).append(text)
        if comparable():
            break
    assert comparable(), f"no variant answered both seeds: {sorted(answers)}"
    template = comparable()[0]
    first, *again = answers[(template, 7)]
    assert all(text == first for text in again), answers[(template, 7)]
    assert answers[(template, 8)][0] != first


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_QUESTION = _user("What is the weather in Paris right now?")


def _call_of(done: Any) -> Any:
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", done
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str), call
    return call


def test_a_tool_call_comes_back_and_its_result_gives_the_final_answer(
    oai: openai.OpenAI,
) -> None:
    done = _ask(
        oai, [WEATHER_QUESTION], tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60
    )
    call = _call_of(done)
    assert done.choices[0].message.content is None
    result = "Sunny and 21 degrees Celsius."
    turns = [
        WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = _ask(oai, turns, tools=[WEATHER_TOOL], max_tokens=60)
    assert final.choices[0].finish_reason == "stop", final
    assert not final.choices[0].message.tool_calls
    assert "21" in _text(final) or "sunny" in _text(final).lower(), _text(final)


def test_a_streamed_tool_call_comes_as_a_tool_call_delta(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        _ask(
            oai,
            [WEATHER_QUESTION],
            tools=[WEATHER_TOOL],
            tool_choice=named,
            stream=True,
            max_tokens=60,
        )
    )
    pieces = [p for c in chunks if c.choices for p in (c.choices[0].delta.tool_calls or [])]
    assert [p.index for p in pieces] == [0], chunks
    (piece,) = pieces
    assert piece.id and piece.function.name == "get_weather"
    assert isinstance(json.loads(piece.function.arguments or "")["city"], str)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls", finishes


def test_a_tool_choice_naming_no_tool_is_400(gateway: Gateway) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    body = {"model": MODEL, "messages": [WEATHER_QUESTION], "tools": [WEATHER_TOOL]}
    got = gateway.post(gateway.key("fields"), body | {"tool_choice": named})
    assert got.status_code == 400, got.text
    assert "get_time" in got.json()["error"]["message"], got.text


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"n": 2, "stream": True}, "n"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
                "logprobs": True,
            },
            "logprobs",
        ),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_a_field_that_cannot_be_honoured_is_400_naming_it(
    gateway: Gateway, fields: dict[str, Any], name: str
) -> None:
    body = {"model": MODEL, "messages": [_user("What is Kafka?")], **fields}
    got = gateway.post(gateway.key("fields"), body)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["message"].startswith(f"{name}:"), got.text


def test_unknown_fields_are_ignored_and_named(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": [_user("What is Kafka?")], "max_tokens": 4}
    got = gateway.post(gateway.key("fields"), body | {"colour": "red", "store": False})
    assert got.status_code == 200, got.text
    assert got.headers["x-kllm-ignored"] == "colour, store"


NODE_PRODUCER = Path(__file__).parent / "node" / "produce.mjs"


def _node_produce(bootstrap: str, key: str, *values: dict[str, Any]) -> None:
    """Publish with kafkajs from Node.js: a producer that is not Python."""
    node = needs.executable("node", "make system-packages, as root")
    if not (NODE_PRODUCER.parent / "node_modules" / "kafkajs").is_dir():
        needs.missing("kafkajs is not installed: make node-packages")
    lines = "".join(json.dumps(v) + "\n" for v in values)
    subprocess.run(
        [node, str(NODE_PRODUCER), bootstrap, REQUESTS.name, key],
        input=lines.encode(),
        check=True,
        timeout=60,
        capture_output=True,
    )


def test_v1_and_v2_records_from_a_non_python_producer_are_answered(
    pipeline: Supervisor, client: Client
) -> None:
    replies = client.tail(RESPONSES)
    v1_id, v2_id = f"kcat-v1-{uuid.uuid4().hex[:6]}", f"kcat-v2-{uuid.uuid4().hex[:6]}"
    v1 = {"schema": "llm.request", "v": 1, "request_id": v1_id, "prompt": "What is Kafka?"}
    v2 = {
        "schema": "llm.request",
        "v": 2,
        "request_id": v2_id,
        "messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is a consumer group?"},
        ],
        "sampling": {"temperature": 0.2, "stop": ["\n\n"]},
        "max_tokens": 12,
    }
    try:
        _node_produce(client.bootstrap, "default", v1, v2)
        got = client.responses(replies, {v1_id, v2_id}, TIMEOUT)
    finally:
        replies.close()
    assert set(got) == {v1_id, v2_id}
    for response in got.values():
        assert response.error is None and response.text


def test_a_follow_up_question_retrieves_the_passage_it_refers_to(
    client: Client, gateway: Gateway, jobs: Replies
) -> None:
    tenant = f"follow-{uuid.uuid4().hex[:6]}"
    docs = {
        "orion-pump": "The Orion pump stalls when its intake filter clogs with sediment. "
        "To fix a stalled Orion pump, flush the intake filter and replace its seal.",
        "zephyr-valve": "The Zephyr valve leaks when its brass gasket wears out after years "
        "of service in the cooling loop.",
        "atlas-fan": "The Atlas fan rattles when a blade bends; its housing is made of steel.",
    }
    receipts = client.tail(DOCUMENTS_INDEXED)
    try:
        for doc_id, text in docs.items():
            key = publish(client, Document(tenant=tenant, doc_id=doc_id, version=1, text=text))
            assert receipt(receipts, key).op == "upsert"
    finally:
        receipts.close()
    key = gateway.keys.create(tenant, "test")[1]
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            _user("Why does the Orion pump stall?"),
            {"role": "assistant", "content": "Its intake filter clogs."},
            _user("and how do I fix that?"),
        ],
    }
    got = gateway.post(key, body)
    assert got.status_code == 200, got.text
    rid = got.json()["id"]
    job = decode(collect(jobs, {rid}, 30)[rid], InferenceJob)
    assert job.context.chunks[0].doc_id == "orion-pump", [c.doc_id for c in job.context.chunks]
    assert [t.role for t in job.messages] == ["system", "user", "assistant", "user"]


def test_a_stream_that_fails_midway_ends_with_an_error_not_a_stop(gateway: Gateway) -> None:
    oai = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key("broken"))
    text, finishes = [], []
    with pytest.raises(openai.APIError) as info:
        stream = oai.chat.completions.create(
            model="scripted", messages=[_user("SCRIPT:broken go")], stream=True
        )
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finishes.append(choice.finish_reason)
    assert "".join(text).startswith("Partitions keep records.")  # sent before the failure
    assert not any(finishes)  # never a clean "stop"
    assert "failed" in str(info.value)


def test_a_failed_answer_is_an_http_error(gateway: Gateway) -> None:
    body = {"model": "scripted", "messages": [_user("SCRIPT:broken go")]}
    got = gateway.post(gateway.key("broken"), body)
    assert got.status_code == 502, got.text
    assert got.json()["error"]["code"] == "engine_error"
