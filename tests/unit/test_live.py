"""LiveStream: the gateway's SSE stream built from moderated deltas and the final response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson

from kllm.gateway.live import LiveStream, data
from kllm.gateway.replies import Reply
from schemas import Message, Response, TokenDelta, Usage
from topics import MODERATED_TOKENS, RESPONSES

RID = "req-1"
DONE = "[DONE]"


def delta(
    index: int, text: str = "", *, final: bool = False, finish: str | None = None, **kw: Any
) -> TokenDelta:
    return TokenDelta(
        request_id=RID,
        index=index,
        text=text,
        model="m",
        final=final,
        finish_reason=finish,
        verdict=kw.pop("verdict", "allowed"),
        **kw,
    )


def closing(index: int, finish: str = "stop", verdict: str = "allowed") -> TokenDelta:
    return delta(index, final=True, finish=finish, verdict=verdict)


def response(text: str = "abc", **kw: Any) -> Response:
    base: dict[str, Any] = {
        "request_id": RID,
        "tenant": "acme",
        "text": text,
        "verdict": "allowed",
        "model": "m",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=3, completion_tokens=4),
    }
    return Response(**{**base, **kw})


def reply(message: Message) -> Reply:
    topic = RESPONSES.name if isinstance(message, Response) else MODERATED_TOKENS.name
    return Reply(topic, message, time.perf_counter())


class Run:
    """One LiveStream driven to its end: the parsed SSE events and the release count."""

    def __init__(
        self,
        messages: Sequence[Message],
        *,
        include_usage: bool = False,
        deadline: float | None = None,
    ) -> None:
        self.released = 0
        self.raw: list[bytes] = []
        self.left = 0
        asyncio.run(asyncio.wait_for(self._run(messages, include_usage, deadline), 5))
        self.events = [parse(b) for b in self.raw]

    def release(self) -> None:
        self.released += 1

    async def _run(
        self, messages: Sequence[Message], include_usage: bool, deadline: float | None
    ) -> None:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        for m in messages[1:]:
            queue.put_nowait(reply(m))
        live = LiveStream(
            queue,
            self.release,
            RID,
            "m",
            time.time() + 30 if deadline is None else deadline,
            include_usage,
        )
        async for chunk in live.events(reply(messages[0])):
            self.raw.append(chunk)
        self.left = queue.qsize()

    @property
    def contents(self) -> list[str]:
        return [
            e["choices"][0]["delta"]["content"]
            for e in self.events[1:]
            if isinstance(e, dict) and e.get("choices") and "content" in e["choices"][0]["delta"]
        ]

    @property
    def finishes(self) -> list[str | None]:
        return [
            e["choices"][0]["finish_reason"]
            for e in self.events
            if isinstance(e, dict) and e.get("choices")
        ]


def parse(event: bytes) -> Any:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    body = event[len(b"data: ") : -2]
    assert b"\n\n" not in body  # one SSE event per piece
    return DONE if body == b"[DONE]" else orjson.loads(body)


def test_data_frames_one_sse_event() -> None:
    assert data({"a": 1}) == b'data: {"a":1}\n\n'


def test_deltas_then_closing_then_response() -> None:
    run = Run(
        [
            delta(0, "Hello"),
            delta(1, " world"),
            delta(2, "."),
            closing(3),
            response(finish_reason="length", template="rag@v1/a"),
        ]
    )
    events = run.events
    assert events[-1] == DONE
    assert DONE not in events[:-1]
    role = events[0]
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert run.contents == ["Hello", " world", "."]
    for e in events[:-1]:
        assert (e["id"], e["object"], e["model"]) == (RID, "chat.completion.chunk", "m")
        assert isinstance(e["created"], int)
    assert len({e["created"] for e in events[:-1]}) == 1
    last = events[-2]
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert last["kllm"]["request_id"] == RID
    assert last["kllm"]["template"] == "rag@v1/a"
    assert run.finishes == [None, None, None, None, "length"]
    assert run.released == 1
    assert run.left == 0


def test_response_before_closing_waits_for_trailing_deltas() -> None:
    run = Run([delta(0, "a"), response(), delta(1, "b"), delta(2, "c"), closing(3)])
    assert run.contents == ["a", "b", "c"]
    assert run.finishes[-1] == "stop"
    assert run.events[-1] == DONE
    assert run.released == 1


def test_response_first_of_all_still_waits_for_the_stream() -> None:
    run = Run([response(), delta(0, "a"), delta(1, "b"), closing(2)])
    assert run.contents == ["a", "b"]  # not the response's text a second time
    assert run.events[-1] == DONE
    assert run.released == 1


def test_stream_ends_once_it_has_both_closing_and_response() -> None:
    run = Run([delta(0, "a"), closing(1), response(), delta(5, "late")])
    assert run.contents == ["a"]
    assert run.left == 1  # the straggler was never read
    assert run.events[-1] == DONE


def test_replayed_deltas_are_sent_once() -> None:
    run = Run(
        [
            delta(0, "a"),
            delta(1, "b"),
            delta(0, "a"),
            delta(1, "b"),
            delta(2, "c"),
            delta(2, "c"),
            closing(3),
            closing(3),
            response(),
        ]
    )
    assert run.contents == ["a", "b", "c"]
    assert run.events.count(DONE) == 1
    assert run.released == 1


def test_content_filter_closing_delta_sets_final_finish_reason() -> None:
    run = Run([delta(0, "Fine."), closing(1, "content_filter", "blocked"), response()])
    assert run.contents == ["Fine."]
    assert run.finishes[-1] == "content_filter"
    assert run.events[-1] == DONE
    # The same response after a normally closed stream keeps its own finish reason.
    assert Run([delta(0, "Fine."), closing(1), response()]).finishes[-1] == "stop"


def test_cached_response_is_sent_whole() -> None:
    run = Run([response("a cached answer", cached=True)])
    assert run.contents == ["a cached answer"]
    assert run.finishes == [None, None, "stop"]
    assert run.events[-2]["kllm"]["cached"] is True
    assert run.events[-1] == DONE
    assert run.released == 1


def test_error_response_without_deltas_ends_the_stream() -> None:
    run = Run([response("", error="engine failed", error_code="engine_error")])
    assert run.contents == []
    assert len(run.events) == 3
    assert run.events[-1] == DONE
    assert run.released == 1


def test_include_usage_adds_a_usage_chunk() -> None:
    run = Run([delta(0, "a"), closing(1), response()], include_usage=True)
    usage = run.events[-2]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert (usage["id"], usage["model"]) == (RID, "m")
    assert run.events[-3]["choices"][0]["finish_reason"] == "stop"
    assert run.events[-1] == DONE
    without = Run([delta(0, "a"), closing(1), response()])
    assert not any(isinstance(e, dict) and "usage" in e for e in without.events)


def test_include_usage_with_content_filter() -> None:
    run = Run(
        [delta(0, "a"), closing(1, "content_filter", "blocked"), response()], include_usage=True
    )
    assert run.events[-3]["choices"][0]["finish_reason"] == "content_filter"
    assert run.events[-2]["choices"] == []


def test_deadline_passed_ends_with_a_timeout_error() -> None:
    t0 = time.perf_counter()
    run = Run([delta(0, "partial")], deadline=time.time() - 5)
    assert time.perf_counter() - t0 < 2
    assert run.contents == ["partial"]
    events = run.events
    assert events[-1] == DONE
    assert events[-2]["error"]["code"] == "timeout"
    finishes = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])]
    assert not any(finishes)  # a cut-off answer never reads as a whole one
    assert run.released == 1


def test_release_runs_when_the_caller_goes_away() -> None:
    released: list[int] = []

    async def main() -> None:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        live = LiveStream(queue, lambda: released.append(1), RID, "m", time.time() + 30, False)
        stream = live.events(reply(delta(0, "a")))
        assert isinstance(stream, AsyncGenerator)
        first = await anext(stream)
        assert parse(first)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        await stream.aclose()  # the client disconnected mid-stream

    asyncio.run(asyncio.wait_for(main(), 5))
    assert released == [1]
