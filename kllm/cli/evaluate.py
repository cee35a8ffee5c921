"""`kllm eval`: run a golden set through the live pipeline, compare two runs, calibrate
the groundedness scorer.

    kllm eval run eval/golden.jsonl            # table, cases.jsonl, summary.json, PNG
    kllm eval compare RUN_A RUN_B --max-drop 0.05   # exit 1 on a regression
    kllm eval calibrate                         # the scorer's thresholds on labelled data
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from kllm.core.errors import ConfigError, PipelineError
from kllm.runtime.settings import KafkaSettings

if TYPE_CHECKING:
    from processors.evaluation import CaseScore, CaseScorer
    from processors.grounding import GroundingScorer

GOLDEN = Path("eval/golden.jsonl")
LABELS = Path("eval/support_labels.jsonl")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval",
        help="golden-set evaluation: run, compare two runs, calibrate the scorer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="eval_command", required=True, metavar="{run,compare,calibrate}")
    run = what.add_parser(
        "run",
        help="send every case through the running pipeline and score the answers",
        description=(
            "Publishes each case of GOLDEN (JSON lines: id, kind, messages, reference, "
            "doc_ids) to the request topic of the running pipeline (KLLM_BOOTSTRAP_SERVERS, "
            "or the one `kllm up` started), at temperature 0, and scores each answer: "
            "context recall, groundedness, citation validity, similarity to the reference, "
            "refusals, latency, tokens and cost. Writes cases.jsonl, summary.json and "
            "summary.png to --out and prints the table. Answers served from the response "
            "cache have no passages to check: run the pipeline with KLLM_CACHE=false."
        ),
    )
    run.add_argument("golden", type=Path, nargs="?", default=GOLDEN, help=f"default {GOLDEN}")
    run.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval/<run id>)")
    run.add_argument("--tenant", default="eval", help="tenant of cases that name none")
    run.add_argument("--model", help="ask this model (default: the pipeline's routing)")
    run.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens")
    run.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds per answer (300)")
    run.add_argument("--limit", type=int, default=None, help="only the first N cases")
    run.add_argument("--label", default="", help="a name for the run, kept in summary.json")

    cmp = what.add_parser(
        "compare",
        help="the metric deltas of run B against run A, with bootstrap intervals",
        description=(
            "Pairs the cases of two runs by id and prints, per metric, A, B, the delta and "
            "its 95%% bootstrap confidence interval. Exits 1 when a gated metric is worse "
            "in B by more than --max-drop (absolute: 0.05 is five points of a share), so "
            "CI can gate on it; latency, tokens and cost are shown, never gated."
        ),
    )
    cmp.add_argument("a", type=Path, help="the baseline run: its folder or cases.jsonl")
    cmp.add_argument("b", type=Path, help="the candidate run")
    cmp.add_argument("--max-drop", type=float, default=0.05, help="allowed drop (0.05)")
    cmp.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=DROP",
        help="a metric's own allowed drop, e.g. groundedness=0.1 (repeatable)",
    )

    cal = what.add_parser(
        "calibrate",
        help="precision and recall of 'unsupported' on labelled sentences, per threshold",
        description=(
            "Scores every labelled sentence of LABELS (JSON lines: sentence, passage, "
            "supported) against its passage with the pipeline's embedding model, and prints "
            "precision and recall of 'unsupported' at the current thresholds and at the best "
            "ones on the grid, also fitted on half of the examples and measured on the other."
        ),
    )
    cal.add_argument("labels", type=Path, nargs="?", default=LABELS, help=f"default {LABELS}")


def cmd_eval(args: argparse.Namespace, settings: KafkaSettings) -> int:
    if args.eval_command == "run":
        return _run(args, settings)
    if args.eval_command == "compare":
        return _compare(args)
    return _calibrate(args)


def _scorers() -> tuple[CaseScorer, GroundingScorer]:
    """The scorers, on the pipeline's embedding model (loaded here, a few seconds)."""
    from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder
    from processors.evaluation import CaseScorer
    from processors.grounding import GroundingScorer

    embedder = SentenceTransformerEmbedder()
    grounding = GroundingScorer(embedder)
    return CaseScorer(embedder, grounding), grounding


def _run(args: argparse.Namespace, settings: KafkaSettings) -> int:
    from tqdm import tqdm

    from kllm.ops import evaluation as ev
    from processors.evaluation import aggregate, load_cases

    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    cases = load_cases(_lines(args.golden))[: args.limit]
    bootstrap = settings.bootstrap()  # before the model loads: no broker, no wait
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:4]
    out: Path = args.out or settings.run_dir / "eval" / run_id
    out.mkdir(parents=True, exist_ok=True)
    scorer, _ = _scorers()
    requests = [ev.request_for(c, run_id, args.tenant, args.max_tokens, args.model) for c in cases]
    asker = ev.PipelineAsker(bootstrap, settings.consumer_config(), settings.producer_config())
    started = time.monotonic()
    with tqdm(total=len(requests), unit="case", desc="asking", file=sys.stderr) as bar:
        answers = asker.ask_all(
            requests,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            on_answer=lambda: bar.update(1),
        )
    took = time.monotonic() - started
    scored = ev.score_all(cases, answers, scorer, run_id, args.timeout)
    scores = [s for s, _ in scored]
    summary = aggregate(scores)
    ev.write_cases(out / "cases.jsonl", scored, cases)
    models = sorted({a.response.model for a in answers.values() if a.response})
    meta = {"run": run_id, "label": args.label, "golden": str(args.golden), "cases": len(cases)}
    modes = dict(sorted(Counter(s.answer_mode for s in scores if s.answered).items()))
    meta |= {"seconds": round(took, 1), "models": models, "answer_modes": modes}
    (out / "summary.json").write_bytes(
        orjson.dumps(meta | {"metrics": summary}, option=orjson.OPT_INDENT_2)
    )
    title = f"{args.label or run_id}: {len(cases)} cases, {', '.join(models) or '-'}"
    ev.plot(out / "summary.png", summary, title)
    _print_summary(scores, summary)
    print(f"\n{len(cases)} cases in {took:.0f} s; written to {out}/")
    print("answers: " + ", ".join(f"{n} {mode}" for mode, n in modes.items()))
    cached = sum(s.cached for s in scores)
    if cached:
        print(f"note: {cached} answers came from the response cache (no passages to check)")
    return 0


def _print_summary(scores: list[CaseScore], summary: dict[str, float | None]) -> None:
    from processors.evaluation import METRICS

    print("\n| metric | value | cases | what it measures |\n|---|---|---|---|")
    for m in METRICS:
        v = summary[m.name]
        shown = "-" if v is None else (f"{v:.0f}" if m.name == "latency_ms" else f"{v:.3f}")
        print(f"| {m.name} | {shown} | {len(m.values(scores))} | {m.what} |")


def _compare(args: argparse.Namespace) -> int:
    from kllm.ops.evaluation import read_cases
    from processors.evaluation import METRICS, compare

    allowed = {m.name: args.max_drop for m in METRICS}
    for item in args.metric:
        name, _, drop = item.partition("=")
        if name not in allowed:
            raise ConfigError(f"--metric {item}: no metric {name!r} ({', '.join(allowed)})")
        try:
            allowed[name] = float(drop)
        except ValueError as exc:
            raise ConfigError(f"--metric {item}: the drop must be a number") from exc
        if not math.isfinite(allowed[name]) or allowed[name] < 0:
            raise ConfigError(f"--metric {item}: the drop must be a number, 0 or more")
    a, b = read_cases(args.a), read_cases(args.b)
    if not {s.id for s in a} & {s.id for s in b}:
        raise PipelineError(f"no case of {args.b} has an id of {args.a}: nothing to compare")
    deltas = compare(a, b)
    print("| metric | A | B | delta | 95% interval | cases | |\n|---|---|---|---|---|---|---|")
    failed = []
    for d in deltas:
        bad = d.metric.gate and d.worse_by() > allowed[d.metric.name]
        failed += [d.metric.name] * bad
        verdict = "WORSE" if bad else ("" if d.metric.gate else "not gated")
        interval = "-" if d.low is None or d.high is None else f"[{d.low:+.3f}, {d.high:+.3f}]"
        print(
            f"| {d.metric.name} | {_num(d.a)} | {_num(d.b)} | {_num(d.delta, '+')} | "
            f"{interval} | {d.cases} | {verdict} |"
        )
    if failed:
        print(f"\nregression: {', '.join(failed)} worse than allowed", file=sys.stderr)
        return 1
    return 0


def _num(v: float | None, sign: str = "") -> str:
    return "-" if v is None else f"{v:{sign}.3f}"


def _calibrate(args: argparse.Namespace) -> int:
    from processors.grounding import GroundingScorer, Labelled, calibrate, measure

    labelled = []
    for number, line in enumerate(_lines(args.labels), 1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
            labelled.append(Labelled(raw["sentence"], raw["passage"], bool(raw["supported"])))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{args.labels} line {number}: {exc}") from exc
    _, grounding = _scorers()
    evidence = grounding.evidence_each([(x.sentence, x.passage) for x in labelled])
    now = measure(grounding, labelled, evidence)
    best = calibrate(grounding, labelled, evidence=evidence)[0]
    fit = calibrate(grounding, labelled[0::2], evidence=evidence[0::2])[0]
    fitted = GroundingScorer(grounding.embedder, fit.min_overlap, fit.min_cosine)
    held = measure(fitted, labelled[1::2], evidence[1::2])
    unsupported = sum(not x.supported for x in labelled)
    print(f"{len(labelled)} labelled sentences, {unsupported} unsupported\n")
    print("| thresholds | overlap | cosine | precision | recall | F1 | on |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("current defaults", now, "all"),
        ("best on the grid", best, "all"),
        ("fitted on even lines", fit, "even lines"),
        ("  measured on odd lines", held, "odd lines"),
    ]
    for name, c, on in rows:
        print(
            f"| {name} | {c.min_overlap:.2f} | {c.min_cosine:.3f} | {c.precision:.3f} | "
            f"{c.recall:.3f} | {c.f1:.3f} | {on} ({c.examples}) |"
        )
    return 0


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason})") from exc
