"""The `kllm` command: run the pipeline, ask it questions, manage its topics."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from kllm.cli import evaluate as cli_eval
from kllm.cli import export as cli_export
from kllm.cli import keys as cli_keys
from kllm.cli import scale as cli_scale
from kllm.cli import shadow as cli_shadow
from kllm.cli import supervision
from kllm.cli import trace as cli_trace
from kllm.core.errors import PipelineError
from kllm.runtime import logs
from kllm.runtime.settings import STATE_FILE, KafkaSettings, write_state
from topics import ProvisionReport

if TYPE_CHECKING:
    from kllm.ops.broker import EmbeddedBroker
    from kllm.ops.supervisor import Supervisor

log = logging.getLogger(__name__)

SAMPLE_QUESTIONS = (
    "What is Kafka used for in this pipeline?",
    "What happens to a malformed request?",
    "Which model generates answers on the CPU?",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kllm",
        description=(
            "Kafka-native LLM serving pipeline. Its stages (gateway, ingestion, retrieval, "
            "inference, moderation, feedback, drift) run as separate processes that talk "
            "only through Kafka topics. "
            "Configuration comes from KLLM_* environment variables; with no "
            "KLLM_BOOTSTRAP_SERVERS, `up` starts an embedded broker."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start broker (if none configured), topics and every stage")
    up.add_argument(
        "--demo",
        action="store_true",
        help="ask sample questions once ready, print the answers, then stop",
    )
    up.add_argument(
        "-q",
        "--question",
        action="append",
        default=[],
        help="a question for --demo (repeatable; default: built-in samples)",
    )
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="processes for a stage, in its consumer group (repeatable)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for every stage to consume (default 180)",
    )
    supervision.add_flags(up)
    _add_storage_flag(up)

    ask = sub.add_parser("ask", help="publish a question to the request topic and print the answer")
    ask.add_argument("question", nargs="+", help="one or more questions, sent concurrently")
    ask.add_argument("--tenant", default="default", help="tenant id (default: default)")
    ask.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    ask.add_argument("--json", action="store_true", help="print the raw response messages")

    ingest = sub.add_parser("ingest", help="publish files (Markdown, text, PDF) to the live corpus")
    ingest.add_argument("paths", nargs="+", type=Path, help="files or folders (walked)")
    ingest.add_argument("--tenant", default="default", help="tenant owning the documents")
    ingest.add_argument("--delete", action="store_true", help="remove these documents instead")
    ingest.add_argument(
        "--no-wait", action="store_true", help="do not wait for the indexer's receipts"
    )
    ingest.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait (default 300)"
    )

    search = sub.add_parser("search", help="show the chunks retrieval would use for a question")
    search.add_argument("query", help="the question")
    search.add_argument("--tenant", default="default", help="tenant whose chunks (and public ones)")
    search.add_argument("--top-k", type=int, default=5, help="hits to show (default 5)")

    cli_keys.add_parser(sub)
    cli_export.add_parser(sub)
    cli_scale.add_parser(sub)
    cli_trace.add_parser(sub)
    cli_eval.add_parser(sub)
    cli_shadow.add_parser(sub)
    sub.add_parser("provision", help="create the declared topics that are missing (idempotent)")
    sub.add_parser("topics", help="list the declared topics: partitions, key, schema, DLQ")
    broker = sub.add_parser(
        "broker",
        help="run only the embedded broker, in the foreground",
        description=(
            "Run the embedded broker (Tansu) until Ctrl-C. Durable by default: its data "
            "lives under KLLM_RUN_DIR/broker (KLLM_BROKER_DATA_DIR) and survives a stop; "
            "a broker or storage process that dies is started again on the same port."
        ),
    )
    broker.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    _add_storage_flag(broker)
    return p


def _add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        choices=["durable", "memory"],
        default=None,
        help=(
            "the embedded broker's storage: durable keeps topics, records and committed "
            "offsets under the run folder across stops and crashes; memory loses them "
            "when it stops (default: KLLM_BROKER_STORAGE or durable)"
        ),
    )


def _embedded_broker(args: argparse.Namespace, settings: KafkaSettings) -> EmbeddedBroker:
    from kllm.ops.broker import BrokerSettings, EmbeddedBroker

    broker_settings = BrokerSettings()
    if args.storage:
        broker_settings = broker_settings.model_copy(update={"storage": args.storage})
    return EmbeddedBroker.from_settings(
        broker_settings, settings.run_dir, port=getattr(args, "port", None)
    )


def _broker_line(broker: EmbeddedBroker) -> str:
    if broker.storage == "durable":
        where = f"durable, data in {broker.data_dir}, storage server pid {broker.storage_pid}"
    else:
        where = "memory storage: its data is lost when it stops"
    return f"embedded broker (Tansu) on {broker.bootstrap}  pid {broker.pid}  ({where})"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = KafkaSettings()
    quiet = {
        "ask",
        "topics",
        "ingest",
        "search",
        "keys",
        "export-dataset",
        "scale",
        "trace",
        "eval",
        "replay",
    }
    logs.configure("WARNING" if args.command in quiet else settings.log_level)
    handlers = {
        "up": cmd_up,
        "ask": cmd_ask,
        "provision": cmd_provision,
        "topics": cmd_topics,
        "broker": cmd_broker,
        "ingest": cmd_ingest,
        "search": cmd_search,
        "keys": cli_keys.cmd_keys,
        "export-dataset": cli_export.cmd_export,
        "scale": cli_scale.cmd_scale,
        "trace": cli_trace.cmd_trace,
        "eval": cli_eval.cmd_eval,
        "shadow": cli_shadow.cmd_shadow,
        "replay": cli_shadow.cmd_replay,
    }
    try:
        return handlers[args.command](args, settings)
    except PipelineError as exc:
        print(f"kllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_topics(_args: argparse.Namespace, settings: KafkaSettings) -> int:
    from topics import declared

    print(f"{'topic':28} {'parts':>5}  {'key':34} {'schema':24} dlq")
    for t in declared(settings.inference_pools):
        schema = f"{t.schema.SCHEMA} v{t.schema.VERSION}" if t.schema else "-"
        dlq = t.dlq.name if t.has_dlq else "-"
        print(f"{t.name:28} {t.partitions:>5}  {t.key:34} {schema:24} {dlq}")
    return 0


def cmd_provision(_args: argparse.Namespace, settings: KafkaSettings) -> int:
    report = _provision(settings.bootstrap(), settings.inference_pools)
    print(f"created {len(report.created)}, already present {len(report.existing)}")
    for line in report.mismatched:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _provision(bootstrap: str, pools: Sequence[str]) -> ProvisionReport:
    from kllm.runtime.kafka import ConfluentTopicAdmin
    from topics import declared, provision

    return provision(ConfluentTopicAdmin(bootstrap), declared(pools))


def cmd_broker(args: argparse.Namespace, settings: KafkaSettings) -> int:
    (settings.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with _embedded_broker(args, settings) as broker:
        write_state(settings.run_dir, broker.bootstrap)
        print(_broker_line(broker), flush=True)
        print("Ctrl-C stops it", flush=True)
        _wait_for_stop_signal(lambda: True, tick=lambda: _say_broker(broker))
    (settings.run_dir / STATE_FILE).unlink(missing_ok=True)
    return 0


class _Stop(Exception):
    pass


def _raise_stop(_sig: int, _frame: FrameType | None) -> None:
    raise _Stop


def _wait_for_stop_signal(
    healthy: Callable[[], bool], tick: Callable[[], object] | None = None
) -> None:
    """Block until SIGINT/SIGTERM, or until ``healthy()`` turns false."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        while healthy():
            if tick:
                tick()
            time.sleep(0.5)
    except _Stop:
        pass


def _say_broker(broker: EmbeddedBroker) -> None:
    for line in broker.supervise():
        print(f"  {line}", flush=True)


def _parse_replicas(items: list[str]) -> dict[str, int]:
    from kllm.ops.supervisor import STAGES

    out = {}
    for item in items:
        stage, _, n = item.partition("=")
        if stage not in STAGES or not n.isdigit() or int(n) < 1:
            raise PipelineError(f"--replicas wants STAGE=N with STAGE in {STAGES}, got {item!r}")
        out[stage] = int(n)
    return out


def cmd_up(args: argparse.Namespace, settings: KafkaSettings) -> int:
    from kllm.ops.supervisor import Supervisor

    replicas = _parse_replicas(args.replicas)
    t0 = time.monotonic()
    broker = None
    signal.signal(signal.SIGTERM, _raise_stop)
    (settings.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        if settings.bootstrap_servers:
            bootstrap = settings.bootstrap_servers
            print(f"using the Kafka broker at {bootstrap}", flush=True)
        else:
            broker = _embedded_broker(args, settings).start()
            bootstrap = broker.bootstrap
            write_state(settings.run_dir, bootstrap)
            print(_broker_line(broker), flush=True)
        report = _provision(bootstrap, settings.inference_pools)
        print(f"topics: {len(report.created)} created, {len(report.existing)} present", flush=True)
        sup = Supervisor(
            settings.run_dir,
            {"KLLM_BOOTSTRAP_SERVERS": bootstrap, "KLLM_RUN_DIR": str(settings.run_dir)}
            | supervision.restart_env(args),
            replicas,
        )
        try:
            sup.start_all()
            print(
                f"starting {len(sup.procs)} stage processes (logs: {settings.run_dir}/logs/)",
                flush=True,
            )
            sup.wait_ready(
                args.ready_timeout,
                lambda sp: print(
                    f"  {sp.name:14} ready  pid {sp.proc.pid if sp.proc else '-'}"
                    f"  ({time.monotonic() - t0:.1f}s)",
                    flush=True,
                ),
                bootstrap=bootstrap,
                on_change=supervision.say,
            )
            print(supervision.ready_line(sup, time.monotonic() - t0), flush=True)
            print(_gateway_banner(), flush=True)
            if args.demo:
                questions = args.question or list(SAMPLE_QUESTIONS)
                code = _ask_and_print(bootstrap, settings, questions, "default", None, 120.0, False)
                return code or _gateway_demo(questions[0])
            print('Ctrl-C stops everything. In another shell: kllm ask "your question"', flush=True)
            sup.write_status()
            # Only a signal stops the pipeline: a stage that keeps crashing is failed alone.
            _wait_for_stop_signal(lambda: True, tick=lambda: _tick(sup, broker))
            return 0
        finally:
            print("stopping stages...", flush=True)
            sup.stop_all()
            (settings.run_dir / "status.json").unlink(missing_ok=True)
    except _Stop:
        return 0
    finally:
        if broker is not None:
            broker.stop()
            (settings.run_dir / STATE_FILE).unlink(missing_ok=True)
        print("stopped", flush=True)


def _tick(sup: Supervisor, broker: EmbeddedBroker | None) -> None:
    if broker is not None:
        _say_broker(broker)
    supervision.tick(sup)


def _gateway_banner() -> str:
    """Where the gateway listens; on first start, a key to call it with."""
    from kllm.gateway.keys import KeyStore
    from services.gateway import Settings as GatewaySettings

    gs = GatewaySettings()
    line = f"gateway (OpenAI API): http://{gs.gateway_host}:{gs.gateway_port}/v1"
    store = KeyStore(gs.keys_path())
    if not any(r.revoked_at is None for r in store.records()):
        _record, secret = store.create("default", "created by kllm up")
        line += f"\n  API key for tenant default (shown once): {secret}"
    return line + "\n  keys: kllm keys create --tenant T | kllm keys list | kllm keys revoke ID"


def _gateway_demo(question: str) -> int:
    """The same question through the OpenAI-compatible gateway, with a key made for it."""
    import httpx

    from kllm.gateway.keys import KeyStore
    from services.gateway import Settings as GatewaySettings

    gs = GatewaySettings()
    store = KeyStore(gs.keys_path())
    record, secret = store.create("default", "kllm up --demo")
    url = f"http://{gs.gateway_host}:{gs.gateway_port}/v1/chat/completions"
    body = {"model": gs.gateway_models[0], "messages": [{"role": "user", "content": question}]}
    try:
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {secret}"}, timeout=120)
    except httpx.HTTPError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        store.revoke(record.id)
    if r.status_code != 200:
        print(f"gateway: HTTP {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    answer = r.json()
    ext = answer["kllm"]
    print(f"via the gateway (POST {url}):\nQ: {question}")
    print(f"A: {answer['choices'][0]['message']['content'].strip()}")
    print(
        f"   [{ext['verdict']} · template {ext['template']} · cached {ext['cached']} · "
        f"pipeline {float(r.headers['x-kllm-pipeline-ms']):.0f} ms · "
        f"gateway {float(r.headers['x-kllm-gateway-ms']):.1f} ms]\n"
    )
    return 0


def cmd_ask(args: argparse.Namespace, settings: KafkaSettings) -> int:
    return _ask_and_print(
        settings.bootstrap(),
        settings,
        args.question,
        args.tenant,
        args.max_tokens,
        args.timeout,
        args.json,
    )


def _ask_and_print(
    bootstrap: str,
    settings: KafkaSettings,
    questions: Sequence[str],
    tenant: str,
    max_tokens: int | None,
    timeout_s: float,
    raw: bool,
) -> int:
    from kllm.runtime.kafka import TailReader, make_producer, produce_sync
    from schemas import Request, Response, decode, encode
    from topics import REQUESTS, RESPONSES

    reader = TailReader(bootstrap, RESPONSES.name, settings.consumer_config())
    producer = make_producer(bootstrap, settings.producer_config())
    asked: dict[str, str] = {}
    try:
        for q in questions:
            req = Request.from_prompt(
                q, request_id=str(uuid.uuid4()), tenant=tenant, max_tokens=max_tokens
            )
            produce_sync(producer, REQUESTS.name, tenant, encode(req))
            asked[req.request_id] = q

        def show(request_id: str, value: bytes) -> None:
            if raw:
                print(value.decode(), flush=True)
                return
            r = decode(value, Response)
            sources = ", ".join(dict.fromkeys(c.doc_id for c in r.citations)) or "none"
            print(
                f"Q: {asked[request_id]}\nA: {r.text.strip() or r.error}\n"
                f"   [{r.verdict} · {r.model or '-'} · {r.usage.completion_tokens} tokens · "
                f"engine {r.engine_ms:.0f} ms · end-to-end {r.pipeline_ms:.0f} ms · "
                f"sources: {sources}]\n",
                flush=True,
            )

        missing = reader.wait_for(set(asked), timeout_s, show)
    finally:
        reader.close()
    if missing:
        print(f"no answer within {timeout_s:.0f}s for {len(missing)} question(s)", file=sys.stderr)
        return 1
    return 0


def cmd_ingest(args: argparse.Namespace, settings: KafkaSettings) -> int:
    from tqdm import tqdm

    from kllm.adapters.retrieval.documents import MAX_DOCUMENT_BYTES, document_for, find_files
    from kllm.runtime.kafka import TailReader, make_producer
    from schemas import DocumentIndexed, decode, encode
    from topics import DOCUMENTS, DOCUMENTS_INDEXED

    files = list(find_files(args.paths))
    if not files:
        raise PipelineError("no Markdown, text or PDF files under the given paths")
    bootstrap = settings.bootstrap()
    receipts = (
        None
        if args.no_wait
        else TailReader(bootstrap, DOCUMENTS_INDEXED.name, settings.consumer_config())
    )
    producer = make_producer(bootstrap, settings.producer_config())
    keys: set[str] = set()
    skipped = 0
    try:
        for path, root in tqdm(files, desc="publishing", unit="doc"):
            doc = document_for(path, root, args.tenant, delete=args.delete)
            value = encode(doc)
            if len(value) > MAX_DOCUMENT_BYTES:
                tqdm.write(f"skipped {path}: {len(value)} bytes, limit {MAX_DOCUMENT_BYTES}")
                skipped += 1
                continue
            key = f"{doc.tenant}/{doc.doc_id}"
            producer.produce(DOCUMENTS.name, key=key, value=value)
            producer.poll(0)
            keys.add(key)
        if producer.flush(30) > 0:
            raise PipelineError("timed out publishing documents")
        if receipts is None:
            print(f"published {len(keys)} documents ({skipped} skipped)")
            return 0 if not skipped else 1
        chunks = 0
        with tqdm(total=len(keys), desc="indexed", unit="doc") as bar:

            def on_receipt(_key: str, value: bytes) -> None:
                nonlocal chunks
                r = decode(value, DocumentIndexed)
                chunks += r.chunks
                if r.op == "skipped":
                    tqdm.write(f"{r.doc_id}: skipped ({r.reason})")
                bar.update(1)

            missing = receipts.wait_for(keys, args.timeout, on_receipt)
    finally:
        if receipts is not None:
            receipts.close()
    print(f"{len(keys) - len(missing)} documents indexed, {chunks} chunks, tenant {args.tenant}")
    if missing:
        print(
            f"no receipt within {args.timeout:.0f}s for {len(missing)} documents "
            "(is the retrieval stage running?)",
            file=sys.stderr,
        )
        return 1
    return 0 if not skipped else 1


def cmd_search(args: argparse.Namespace, _settings: KafkaSettings) -> int:
    from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder
    from kllm.adapters.retrieval.qdrant import open_store
    from processors.retrieval import PUBLIC_TENANT
    from services.retrieval import Settings

    rs = Settings()
    store = open_store(rs.qdrant_url, rs.qdrant_path, rs.collection)
    try:
        embedder = SentenceTransformerEmbedder(rs.embed_model or None)
        store.ensure_collection(embedder.dim)
        (vector,) = embedder.embed([args.query])
        hits = store.search(vector, [args.tenant, PUBLIC_TENANT], args.top_k, rs.min_score)
    finally:
        store.close()
    if not hits:
        print(f"no chunk scores above {rs.min_score} for tenant {args.tenant}")
        return 1
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        print(f"[{i}] {h.score:.3f}  {h.doc_id}  ({h.source})\n    {text[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
