"""Output moderation through the real broker, the real stages and the gateway.

The answers come from a scripted engine (see kllm/testing/scripted_engine.py) so that they are
toxic, leak PII or echo the system prompt on demand; everything else is real:
the inference stage's HTTP engine adapter, the moderation stage with its real
classifier, presidio and the repository's policies, the gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kllm.gateway.keys import KeyStore
from kllm.ops.supervisor import Supervisor
from processors.moderation import BLOCKED_TEXT
from schemas import ModerationEvent, TokenDelta, decode
from tests.e2e.conftest import Client, Replies
from topics import MODERATED_TOKENS, MODERATION_EVENTS, TOKENS

TIMEOUT = 120.0


class Caller:
    def __init__(self, pipeline: Supervisor, tenant: str) -> None:
        self.url = f"http://127.0.0.1:{pipeline.env['KLLM_GATEWAY_PORT']}/v1"
        keys = KeyStore(Path(pipeline.env["KLLM_RUN_DIR"]) / "keys.json")
        self.key = keys.create(tenant, "moderation test")[1]
        self.oai = openai.OpenAI(base_url=self.url, api_key=self.key, timeout=TIMEOUT)

    def ask(self, script: str) -> dict[str, object]:
        body = {"model": "scripted", "messages": [{"role": "user", "content": _q(script)}]}
        r = httpx.post(
            f"{self.url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {self.key}"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def stream(self, script: str) -> tuple[str, str | None, dict[str, object]]:
        """The streamed text, the last finish reason, and the kllm extension."""
        text, finish, ext = "", None, {}
        for chunk in self.oai.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": _q(script)}],
            stream=True,
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            ext = (chunk.model_extra or {}).get("kllm", ext)
        return text, finish, ext


def _q(script: str) -> str:
    # Unique per call: the response cache must not answer these.
    return f"SCRIPT:{script} question {uuid.uuid4().hex[:8]}: what does this mean?"


@pytest.fixture(scope="module")
def caller(pipeline: Supervisor) -> Caller:
    return Caller(pipeline, "mod-default")


@pytest.fixture()
def topics(client: Client) -> Iterator[dict[str, Replies]]:
    readers = {t.name: client.tail(t) for t in (TOKENS, MODERATED_TOKENS, MODERATION_EVENTS)}
    yield readers
    for r in readers.values():
        r.close()


def _records(reader: Replies, key: str, seconds: float = 3.0) -> list[bytes]:
    return [v for k, v in reader.reader.records(seconds) if k == key]


def test_toxic_answer_is_blocked_for_a_non_streaming_caller(caller: Caller) -> None:
    answer = caller.ask("toxic")
    assert answer["choices"][0]["message"]["content"] == BLOCKED_TEXT  # type: ignore[index]
    assert answer["choices"][0]["finish_reason"] == "content_filter"  # type: ignore[index]
    ext = answer["kllm"]
    assert ext["verdict"] == "blocked"  # type: ignore[index]


def test_pii_is_redacted_for_a_non_streaming_caller(caller: Caller) -> None:
    answer = caller.ask("pii")
    text = answer["choices"][0]["message"]["content"]  # type: ignore[index]
    assert "jane.roe@example.com" not in text and "212-555-0199" not in text
    assert "<EMAIL_ADDRESS>" in text and answer["kllm"]["verdict"] == "redacted"  # type: ignore[index]


def test_toxic_stream_stops_at_the_blocked_window_and_no_raw_delta_reaches_callers(
    caller: Caller, topics: dict[str, Replies]
) -> None:
    text, finish, ext = caller.stream("toxic")
    assert text.startswith("Kafka keeps records in partitions.")
    for word in ("idiot", "fucking", "SECRET-TAIL"):
        assert word not in text
    assert finish == "content_filter"
    rid = str(ext["request_id"])
    raw = "".join(decode(v, TokenDelta).text for v in _records(topics[TOKENS.name], rid))
    assert "idiot" in raw  # the engine did say it ...
    moderated = [decode(v, TokenDelta) for v in _records(topics[MODERATED_TOKENS.name], rid)]
    seen = "".join(d.text for d in moderated)
    assert "idiot" not in seen and "SECRET-TAIL" not in seen  # ... no caller could read it
    assert moderated[-1].final and moderated[-1].finish_reason == "content_filter"
    events = [decode(v, ModerationEvent) for v in _records(topics[MODERATION_EVENTS.name], rid)]
    assert any(e.window is not None and "toxicity" in e.checks for e in events)


def test_pii_is_redacted_in_the_stream(caller: Caller, topics: dict[str, Replies]) -> None:
    text, finish, ext = caller.stream("pii")
    assert "jane.roe@example.com" not in text and "212-555-0199" not in text
    assert "<EMAIL_ADDRESS>" in text and finish == "stop"
    rid = str(ext["request_id"])
    for v in _records(topics[MODERATED_TOKENS.name], rid):
        assert b"jane.roe@example.com" not in v and b"212-555-0199" not in v


def test_clean_stream_arrives_in_windows_and_matches_the_final_answer(
    caller: Caller, topics: dict[str, Replies]
) -> None:
    text, finish, ext = caller.stream("clean")
    assert text.startswith("Partitions keep records in order by key.")
    assert finish == "stop" and ext["verdict"] == "allowed"
    rid = str(ext["request_id"])
    windows = [decode(v, TokenDelta) for v in _records(topics[MODERATED_TOKENS.name], rid)]
    assert len([w for w in windows if not w.final]) == 3  # one per sentence
    assert "".join(w.text for w in windows) == text


def test_an_answer_echoing_the_system_prompt_is_blocked(caller: Caller) -> None:
    answer = caller.ask("echo")
    assert answer["kllm"]["verdict"] == "blocked"  # type: ignore[index]
    text, finish, _ = caller.stream("echo")
    # The first sentence shares only five words with the prompt, below the 8-word run
    # that makes an echo; the run completes in the next window, which is withheld.
    assert "numbered context passages" not in text and "briefly" not in text
    assert finish == "content_filter"


def test_policies_are_per_tenant_and_their_version_is_recorded(
    pipeline: Supervisor, caller: Caller
) -> None:
    acme = Caller(pipeline, "acme")  # acme denies naming competitors (policies/moderation)
    blocked = acme.ask("competitor")
    assert blocked["kllm"]["verdict"] == "blocked"  # type: ignore[index]
    assert blocked["kllm"]["policy"] == "moderation@v1/acme"  # type: ignore[index]
    allowed = caller.ask("competitor")
    assert allowed["kllm"]["verdict"] == "allowed"  # type: ignore[index]
    assert allowed["kllm"]["policy"] == "moderation@v1/default"  # type: ignore[index]
