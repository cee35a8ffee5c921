"""kllm.ops.export: time parsing, filters, dedup, row shapes and the JSONL/Parquet writers."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from kllm.core.errors import ConfigError
from kllm.ops.export import Filter, chat_row, flat_row, latest_per_request, parse_when, write
from schemas import ChatTurn, FeedbackEnriched, FunctionCall, ToolCall, Usage

NOW = 1_700_000_000.0


def record(**kw: Any) -> FeedbackEnriched:
    base: dict[str, Any] = {
        "request_id": "r1",
        "tenant": "acme",
        "status": "joined",
        "rating": 4,
        "label": "helpful",
        "comment": "nice",
        "feedback_at": 1000.0,
        "model": "m1",
        "prompt": "What is Kafka?",
        "answer": "A distributed log.",
        "verdict": "allowed",
        "finish_reason": "stop",
        "chunk_ids": ["c1", "c2"],
        "top_score": 0.8,
        "prompt_pii": ["PERSON"],
        "pipeline_ms": 120.0,
        "usage": Usage(prompt_tokens=30, completion_tokens=9),
        "cost_usd": 0.002,
    }
    base.update(kw)
    return FeedbackEnriched(**base)


def orphan(**kw: Any) -> FeedbackEnriched:
    base: dict[str, Any] = {
        "request_id": "o1",
        "tenant": "acme",
        "status": "orphan",
        "reason": "unknown request id",
        "rating": 2,
        "feedback_at": 1000.0,
    }
    base.update(kw)
    return FeedbackEnriched(**base)


# -- parse_when -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "age_s"),
    [("30m", 1800), ("24h", 86400), ("7d", 7 * 86400), ("2w", 14 * 86400), ("90s", 90)],
)
def test_parse_when_relative(text: str, age_s: float) -> None:
    assert parse_when(text, now=NOW) == NOW - age_s


def test_parse_when_relative_fraction_and_spaces() -> None:
    assert parse_when(" 1.5h ", now=NOW) == NOW - 5400


def test_parse_when_relative_defaults_to_the_clock() -> None:
    import time

    before = time.time()
    t = parse_when("1h")
    assert before - 3600 - 1 <= t <= time.time() - 3600


def test_parse_when_iso_datetime_with_offset() -> None:
    assert parse_when("2024-01-02T03:04:05+00:00", now=NOW) == 1704164645.0
    assert parse_when("2024-01-02T03:04:05Z") == 1704164645.0
    assert parse_when("2024-01-02T05:04:05+02:00") == 1704164645.0


def test_parse_when_iso_date_and_naive_datetime_are_local_time() -> None:
    assert parse_when("2024-01-02", now=NOW) == datetime(2024, 1, 2).timestamp()
    assert parse_when("2024-01-02T03:04") == datetime(2024, 1, 2, 3, 4).timestamp()


@pytest.mark.parametrize("text", ["", "yesterday", "7x", "d7", "-7d", "2024-13-01", "7 d"])
def test_parse_when_garbage_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="neither an ISO"):
        parse_when(text, now=NOW)


# -- Filter -----------------------------------------------------------------------------


def test_default_filter_keeps_joined_and_drops_orphans() -> None:
    assert Filter().matches(record())
    assert not Filter().matches(orphan())
    assert Filter(orphans=True).matches(orphan())
    assert Filter(orphans=True).matches(record())


def test_filter_by_tenant_and_model() -> None:
    r = record(tenant="acme", model="m1")
    assert Filter(tenant="acme").matches(r)
    assert not Filter(tenant="other").matches(r)
    assert Filter(model="m1").matches(r)
    assert not Filter(model="m2").matches(r)
    assert not Filter(tenant="acme", model="m2").matches(r)


def test_filter_since_is_inclusive_until_exclusive() -> None:
    f = Filter(since=100.0, until=200.0)
    assert not f.matches(record(feedback_at=99.999))
    assert f.matches(record(feedback_at=100.0))
    assert f.matches(record(feedback_at=199.999))
    assert not f.matches(record(feedback_at=200.0))


@pytest.mark.parametrize(
    ("rating", "kept"), [(1, False), (2, True), (3, True), (4, True), (5, False)]
)
def test_filter_rating_range(rating: int, kept: bool) -> None:
    assert Filter(min_rating=2, max_rating=4).matches(record(rating=rating)) is kept


def test_orphans_filtered_by_tenant_too() -> None:
    f = Filter(tenant="acme", orphans=True)
    assert f.matches(orphan(tenant="acme"))
    assert not f.matches(orphan(tenant="other"))


# -- latest_per_request -----------------------------------------------------------------


def test_latest_per_request_keeps_the_latest_and_sorts_by_time() -> None:
    records = [
        record(request_id="a", feedback_at=50.0, rating=1),
        record(request_id="b", feedback_at=10.0, rating=3),
        record(request_id="a", feedback_at=70.0, rating=5),
        record(request_id="c", feedback_at=30.0, rating=2),
        record(request_id="a", feedback_at=60.0, rating=2),  # arrives late, older: ignored
    ]
    out = latest_per_request(iter(records))
    assert [(r.request_id, r.feedback_at, r.rating) for r in out] == [
        ("b", 10.0, 3),
        ("c", 30.0, 2),
        ("a", 70.0, 5),
    ]


def test_latest_per_request_of_nothing() -> None:
    assert latest_per_request(iter([])) == []


# -- rows -------------------------------------------------------------------------------


def test_chat_row_shape() -> None:
    row = chat_row(record())
    assert row["messages"] == [
        {"role": "user", "content": "What is Kafka?"},
        {"role": "assistant", "content": "A distributed log."},
    ]
    assert (row["rating"], row["label"], row["comment"]) == (4, "helpful", "nice")
    meta = row["metadata"]
    for gone in ("prompt", "answer", "rating", "label", "comment"):
        assert gone not in meta
    assert meta["request_id"] == "r1"
    assert meta["tenant"] == "acme"
    assert meta["model"] == "m1"
    assert meta["chunk_ids"] == ["c1", "c2"]
    assert meta["usage"] == {"prompt_tokens": 30, "completion_tokens": 9}
    assert set(row) == {"messages", "rating", "label", "comment", "metadata"}


def test_chat_row_of_an_orphan_has_empty_messages() -> None:
    row = chat_row(orphan())
    assert [m["content"] for m in row["messages"]] == ["", ""]
    assert row["metadata"]["status"] == "orphan"


def test_flat_row_flattens_usage() -> None:
    row = flat_row(record())
    assert "usage" not in row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (30, 9)
    assert row["prompt"] == "What is Kafka?"
    assert row["rating"] == 4
    assert row["chunk_ids"] == ["c1", "c2"]


def test_flat_row_without_usage() -> None:
    row = flat_row(orphan())
    assert "usage" not in row
    assert row["prompt_tokens"] is None
    assert row["completion_tokens"] is None


# -- write ------------------------------------------------------------------------------


def some_records() -> list[FeedbackEnriched]:
    return [
        record(),
        record(request_id="r2", rating=1, comment=None, usage=None, chunk_ids=[], top_score=None),
        orphan(),
    ]


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    records = some_records()
    path = tmp_path / "sub" / "out.jsonl"
    write(records, path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    assert [orjson.loads(line) for line in lines] == [chat_row(r) for r in records]


def test_write_parquet_round_trips(tmp_path: Path) -> None:
    records = some_records()
    path = tmp_path / "out.parquet"
    write(records, path)
    table = pq.read_table(path)
    assert table.num_rows == 3
    assert table.to_pylist() == [flat_row(r) for r in records]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet"])
def test_write_nothing_gives_a_readable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write([], path)
    assert path.exists()
    if name.endswith(".jsonl"):
        assert path.read_bytes() == b""
    else:
        assert pq.read_table(path).num_rows == 0


@pytest.mark.parametrize("name", ["out.csv", "out.json", "out.jsonl.gz", "out"])
def test_write_other_suffix_is_a_config_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"\.jsonl or \.parquet"):
        write(some_records(), tmp_path / name)
    assert not (tmp_path / name).exists()


def test_a_chat_row_is_the_whole_transcript_with_the_answer_s_calls() -> None:
    turns = [
        ChatTurn(role="system", content="Be brief."),
        ChatTurn(role="user", content="What is Kafka?"),
        ChatTurn(role="assistant", content="A log."),
        ChatTurn(role="user", content="Look up partitions."),
    ]
    call = ToolCall(id="c1", function=FunctionCall(name="lookup", arguments='{"q": "p"}'))
    r = record(messages=turns, prompt="Look up partitions.", answer="", tool_calls=[call])
    row = chat_row(r)
    assert row["messages"][:4] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is Kafka?"},
        {"role": "assistant", "content": "A log."},
        {"role": "user", "content": "Look up partitions."},
    ]
    assert row["messages"][4] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call.model_dump(mode="json")],
    }
    assert "messages" not in row["metadata"] and "tool_calls" not in row["metadata"]
    flat = flat_row(r)
    assert orjson.loads(flat["messages"])[3]["content"] == "Look up partitions."
    assert orjson.loads(flat["tool_calls"])[0]["function"]["name"] == "lookup"
