"""Trace context through Kafka headers, span files, and `kllm trace`'s reading of them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kllm.cli.trace import find_trace, read_spans, render
from kllm.runtime import tracing
from kllm.runtime.logs import JsonFormatter
from topics import GENERATIONS, REQUESTS, RETRIEVAL

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: OpenTelemetry ignores a second
    yield exporter


def test_a_record_span_is_a_child_of_the_context_in_the_consumed_headers(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    consumed = [("other", b"x"), ("traceparent", CALLER.encode())]
    with tracing.record_span(
        tracing.Where("ingestion", REQUESTS.name, 2, 41), consumed, "r-1"
    ) as span:
        produced = tracing.headers_for(span)
    (done,) = spans.get_finished_spans()
    assert format(done.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert done.parent is not None and format(done.parent.span_id, "016x") == "b7ad6b7169203331"
    assert done.attributes is not None and done.attributes["kllm.request_id"] == "r-1"
    assert done.attributes["messaging.kafka.offset"] == 41
    # The produced record carries this span, so the next stage becomes its child.
    (key, value), *_ = produced
    assert key == "traceparent"
    assert value.decode().split("-")[1:3] == [
        "0af7651916cd43dd8448eb211c80319c",
        format(done.context.span_id, "016x"),
    ]


def test_a_record_without_trace_context_starts_a_trace(spans: InMemorySpanExporter) -> None:
    spans.clear()
    with tracing.record_span(tracing.Where("moderation", GENERATIONS.name, 0, 0), None):
        pass
    with tracing.record_span(
        tracing.Where("moderation", GENERATIONS.name, 0, 1), [("traceparent", b"junk")]
    ):
        pass
    first, second = spans.get_finished_spans()
    assert first.parent is None and second.parent is None
    assert first.context.trace_id != second.context.trace_id


def test_the_server_span_continues_the_callers_trace_and_reports_its_id(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    caller = {"traceparent": CALLER}.items()
    with tracing.server_span("gateway", "POST /v1/chat/completions", caller):
        assert tracing.trace_id() == "0af7651916cd43dd8448eb211c80319c"
        produced = tracing.headers_for()  # the current span: what the gateway publishes
    (done,) = spans.get_finished_spans()
    assert produced[0][1].decode().split("-")[2] == format(done.context.span_id, "016x")


def test_span_files_are_read_back_as_one_tree_per_request(tmp_path: Path) -> None:
    # Its own provider, writing JSON lines as `file` export does.
    provider = TracerProvider(resource=Resource.create({"service.name": "kllm-t"}))
    provider.add_span_processor(SimpleSpanProcessor(tracing._exporter("t", "file", tmp_path)))
    tracer = provider.get_tracer("t")
    root = tracer.start_as_current_span("root", attributes={"kllm.request_id": "req-9"})
    with root, tracer.start_as_current_span("child"):
        pass
    with tracer.start_as_current_span("unrelated"):
        pass
    provider.shutdown()
    folder = tmp_path / tracing.TRACES_DIR
    (folder / "cut.jsonl").write_text('{"name": "half a li')  # a crash mid-line
    rows = read_spans(folder)
    assert len(rows) == 3
    found = find_trace(rows, "req-9")
    assert [r.name for r in found] == ["root", "child"]
    assert find_trace(rows, found[0].trace_id) == found
    lines = render(found)
    assert lines[0].startswith("t: root") and lines[1].startswith("  t: child")
    assert find_trace(rows, "nobody") == []


def test_a_log_line_inside_a_record_span_names_its_trace(spans: InMemorySpanExporter) -> None:
    formatter = JsonFormatter()
    outside = orjson.loads(formatter.format(logging.makeLogRecord({"msg": "idle"})))
    with tracing.record_span(
        tracing.Where("retrieval", RETRIEVAL.name, 1, 7), [("traceparent", CALLER)]
    ):
        inside = orjson.loads(formatter.format(logging.makeLogRecord({"msg": "searched"})))
    assert "trace_id" not in outside
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert inside["span_id"] == format(spans.get_finished_spans()[-1].context.span_id, "016x")
