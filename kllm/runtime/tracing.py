"""OpenTelemetry traces carried in Kafka headers: one request is one trace across stages.

The gateway starts a request's trace (or continues the caller's W3C ``traceparent``);
every stage continues it from the ``traceparent`` header of the record it consumes,
records one span for its work on that record, and writes that span's context into
the headers of every record it produces for it.

Where spans go (``KLLM_TRACE_EXPORT``):

- ``none`` (default): nothing is recorded, but the context still passes through, so
  a stage with tracing on still joins the trace.
- ``file``: JSON lines under ``<run_dir>/traces/``, one file per process (``kllm trace``
  reads them).
- ``otlp``: OTLP over HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (an OpenTelemetry
  collector, Jaeger, Tempo).
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal, NamedTuple

from opentelemetry import context, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Export = Literal["none", "file", "otlp"]
Headers = list[tuple[str, bytes]]
"""Kafka record headers as confluent-kafka and quixstreams hand them over."""
HeaderPairs = Iterable[tuple[str, bytes | str | None]]
"""What a trace context is read from: record headers, or an HTTP request's."""

TRACES_DIR = "traces"
_PROPAGATOR = TraceContextTextMapPropagator()


class _HeaderGetter(Getter[Sequence[tuple[str, bytes | str | None]]]):
    def get(self, carrier: Sequence[tuple[str, bytes | str | None]], key: str) -> list[str] | None:
        found = [_text(v) for k, v in carrier if k.lower() == key]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, bytes | str | None]]) -> list[str]:
        return [k for k, _ in carrier]


class _HeaderSetter(Setter[Headers]):
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def configure(service: str, export: Export, run_dir: Path) -> None:
    """Install this process's tracer provider; call once from ``main()``."""
    if export == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"kllm-{service}"}))
    # Exported every half second so `kllm trace` finds a request's spans right after it.
    batches = BatchSpanProcessor(_exporter(service, export, run_dir), schedule_delay_millis=500)
    provider.add_span_processor(batches)
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # exports what is still buffered


def _exporter(service: str, export: Export, run_dir: Path) -> SpanExporter:
    if export == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint and headers from the OTEL_EXPORTER_OTLP_* env
    folder = run_dir / TRACES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    out: IO[str] = (folder / f"{service}-{os.getpid()}.jsonl").open("a", encoding="utf-8")
    return ConsoleSpanExporter(out=out, formatter=_one_line)


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


@functools.cache
def tracer(stage: str) -> trace.Tracer:
    """One per stage, not one per record. Safe before ``configure``: the API hands out a
    proxy that follows the provider set later."""
    return trace.get_tracer(f"kllm.{stage}")


def parent(headers: HeaderPairs | None) -> context.Context:
    """The trace context a record's headers carry (an empty one if none)."""
    return _PROPAGATOR.extract(list(headers or ()), getter=_HeaderGetter())


def headers_for(span: Span | None = None) -> Headers:
    """Headers carrying ``span``'s context (default: the current span's)."""
    carrier: Headers = []
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx, setter=_HeaderSetter())
    return carrier


def trace_id(span: Span | None = None) -> str:
    """The hex trace id of ``span`` (default: the current span), empty when none."""
    got = (span or trace.get_current_span()).get_span_context()
    return format(got.trace_id, "032x") if got.is_valid else ""


class Where(NamedTuple):
    """Which stage consumed which record."""

    stage: str
    topic: str
    partition: int
    offset: int


def start_record_span(where: Where, headers: HeaderPairs | None, request_id: str = "") -> Span:
    """A span for a stage's work on one consumed record, child of the record's context."""
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation": "process",
        "messaging.destination.name": where.topic,
        "messaging.destination.partition.id": str(where.partition),
        "messaging.kafka.offset": where.offset,
    }
    if request_id:
        attributes["kllm.request_id"] = request_id
    return tracer(where.stage).start_span(
        f"{where.stage} process",
        context=parent(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )


@contextmanager
def record_span(where: Where, headers: HeaderPairs | None, request_id: str = "") -> Iterator[Span]:
    """``start_record_span`` as a context manager that ends the span and records errors."""
    span = start_record_span(where, headers, request_id)
    with trace.use_span(span, end_on_exit=True, record_exception=True):
        yield span


@contextmanager
def server_span(service: str, name: str, headers: HeaderPairs) -> Iterator[Span]:
    """The span of an HTTP request, child of the caller's ``traceparent`` if it sent one."""
    with tracer(service).start_as_current_span(
        name, context=parent(headers), kind=SpanKind.SERVER, record_exception=True
    ) as span:
        yield span
