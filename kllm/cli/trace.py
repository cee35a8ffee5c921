"""`kllm trace ID`: one request's trace across the stages, from the span files.

Reads what ``KLLM_TRACE_EXPORT=file`` wrote under ``<run_dir>/traces`` and prints the
spans of the trace a request id (or trace id) belongs to as a tree: which stage, when
it started after the gateway took the request, and how long it worked.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from kllm.core.errors import PipelineError
from kllm.runtime.settings import KafkaSettings
from kllm.runtime.tracing import TRACES_DIR


@dataclass(frozen=True)
class SpanRow:
    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    start: float
    end: float
    attributes: dict[str, Any]

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _row(raw: dict[str, Any]) -> SpanRow:
    ctx = raw["context"]
    return SpanRow(
        trace_id=ctx["trace_id"].removeprefix("0x"),
        span_id=ctx["span_id"].removeprefix("0x"),
        parent_id=(raw.get("parent_id") or "").removeprefix("0x") or None,
        service=raw.get("resource", {}).get("attributes", {}).get("service.name", "?"),
        name=raw["name"],
        start=_seconds(raw["start_time"]),
        end=_seconds(raw["end_time"]),
        attributes=raw.get("attributes") or {},
    )


def read_spans(folder: Path) -> list[SpanRow]:
    """Every span in the folder's files; a line cut short by a crash is skipped."""
    rows: list[SpanRow] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                rows.append(_row(orjson.loads(line)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return rows


def find_trace(spans: list[SpanRow], wanted: str) -> list[SpanRow]:
    """The spans of the trace whose id is ``wanted`` or that a request id ``wanted`` is in,
    oldest first."""
    ids = {s.trace_id for s in spans if wanted in (s.trace_id, s.attributes.get("kllm.request_id"))}
    return sorted((s for s in spans if s.trace_id in ids), key=lambda s: s.start)


def render(spans: list[SpanRow]) -> list[str]:
    """One line per span, children indented under their parent."""
    if not spans:
        return []
    t0 = spans[0].start
    known = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRow]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in known else None, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            at = (s.start - t0) * 1000
            label = f"{'  ' * depth}{s.service.removeprefix('kllm-')}: {s.name}"
            lines.append(f"{label:<48} +{at:9.1f} ms {s.ms:9.1f} ms")
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return lines


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trace",
        help="show one request's spans across the stages (needs KLLM_TRACE_EXPORT=file)",
    )
    p.add_argument("id", help="a request id (x-request-id) or trace id (x-kllm-trace-id)")


def cmd_trace(args: argparse.Namespace, settings: KafkaSettings) -> int:
    folder = settings.run_dir / TRACES_DIR
    if not folder.is_dir():
        raise PipelineError(
            f"no spans in {folder}: run the pipeline with KLLM_TRACE_EXPORT=file to record them"
        )
    spans = find_trace(read_spans(folder), args.id)
    if not spans:
        raise PipelineError(f"no trace with request or trace id {args.id!r} in {folder}")
    print(f"trace {spans[0].trace_id} ({len(spans)} spans)")
    sys.stdout.write("".join(line + "\n" for line in render(spans)))
    return 0
