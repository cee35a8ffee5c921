"""`kllm shadow start|report` and `kllm replay`: a candidate model or template on copies
of real traffic, scored beside the live answers, with no caller ever reading it.

    kllm shadow start --model big --sample 0.1      # follow live jobs until Ctrl-C
    kllm replay --since 24h --model big             # re-run retained jobs, then exit
    kllm shadow report                              # win rate and deltas, per metric

The candidate is a model of ``KLLM_MODELS`` (the inference stage's list); a template
tag (``--template rag@v2/b``) swaps the system prompt. Answers go to
llm.generations.shadow; the evaluation stage scores them into llm.evaluations beside
the live answers it sampled (``KLLM_EVAL_SAMPLE``, the same draw by request id).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from kllm.core.errors import ConfigError
from kllm.runtime.settings import KafkaSettings
from topics import GENERATIONS_SHADOW, INFERENCE, SHADOW_GROUP_PREFIX, inference_topic, shadow_group


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "shadow",
        help="a candidate model on a copy of live traffic; its report against the live model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="shadow_command", required=True, metavar="{start,report}")
    start = what.add_parser(
        "start",
        help="follow live inference jobs with the candidate until Ctrl-C",
        description=f"Joins the consumer group {SHADOW_GROUP_PREFIX}NAME on "
        f"{INFERENCE.name} (a copy of the live jobs, beside the inference workers) and "
        f"answers the sampled jobs with the candidate into {GENERATIONS_SHADOW.name}. Runs "
        "in the foreground until Ctrl-C; its committed offsets let a restart continue "
        "where it stopped.",
    )
    _candidate_args(start)
    start.add_argument("--name", default="candidate", help="the shadow's name (its group)")
    start.add_argument(
        "--sample",
        type=float,
        default=0.1,
        help="share of jobs copied, 0..1, drawn as the evaluation stage draws: at or under "
        "KLLM_EVAL_SAMPLE every shadowed request has its live answer scored (default 0.1)",
    )
    rep = what.add_parser("report", help="the candidate against the live answers, per metric")
    rep.add_argument("--model", help="only this shadow model (default: all)")
    rep.add_argument("--since", help="shadow answers from this time on (ISO, or an age: 24h)")
    rep.add_argument("--json", action="store_true", help="rows as JSON")

    replay = sub.add_parser(
        "replay",
        help="re-run retained inference jobs through a candidate (no live traffic needed)",
        description=f"Reads the jobs on {INFERENCE.name} produced between --since and "
        "--until (from what the topic retains), answers each with the candidate, in "
        f"process, and publishes the answers to {GENERATIONS_SHADOW.name}, where the "
        "evaluation stage scores them. Exits when every answer is acknowledged.",
    )
    _candidate_args(replay)
    replay.add_argument("--since", required=True, help="ISO date/time, or an age: 30m, 24h, 7d")
    replay.add_argument("--until", help="ISO date/time or age (default: now)")
    replay.add_argument("--limit", type=int, help="at most this many jobs")


def _candidate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the candidate: a model of KLLM_MODELS")
    p.add_argument("--template", help="a candidate template tag, e.g. rag@v2/b")
    p.add_argument("--pool", default="", help="the inference pool whose jobs to copy")


def cmd_shadow(args: argparse.Namespace, settings: KafkaSettings) -> int:
    if args.shadow_command == "start":
        return _start(args, settings)
    return _report(args, settings)


def _candidate_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"KLLM_SHADOW_MODEL": args.model, "KLLM_POOL": args.pool}
    if args.template:
        env["KLLM_SHADOW_TEMPLATE"] = args.template
    return env


def _start(args: argparse.Namespace, settings: KafkaSettings) -> int:
    if not 0.0 <= args.sample <= 1.0:
        raise ConfigError("--sample must be in [0, 1]")
    try:
        group = shadow_group(args.name, args.pool)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    env = os.environ | _candidate_env(args)
    env |= {
        "KLLM_SHADOW_NAME": args.name,
        "KLLM_SHADOW_SAMPLE": str(args.sample),
        "KLLM_BOOTSTRAP_SERVERS": settings.bootstrap(),
    }
    print(f"shadow {args.model} in {group.name}: Ctrl-C stops it", file=sys.stderr, flush=True)
    # This process becomes the worker: Ctrl-C, SIGTERM and its exit status are its own.
    os.execve(sys.executable, [sys.executable, "-m", "services.shadow"], env)


def _report(args: argparse.Namespace, settings: KafkaSettings) -> int:
    import orjson

    from kllm.ops.export import parse_when, read_topic
    from processors.shadow_report import pairs, report
    from schemas import Evaluation
    from topics import EVALUATIONS

    since = parse_when(args.since) if args.since else None
    evaluations = list(read_topic(settings.bootstrap(), EVALUATIONS.name, Evaluation))
    shadows = {
        e.request_id
        for e in evaluations
        if e.source == "shadow"
        and (args.model is None or e.model == args.model)
        and (since is None or e.evaluated_at >= since)
    }
    found = [p for p in pairs(evaluations, args.model) if p.shadow.request_id in shadows]
    if len(shadows) > len(found):
        left = len(shadows) - len(found)
        print(f"{left} shadow answers have no live evaluation (KLLM_EVAL_SAMPLE did not "
              "draw them): left out", file=sys.stderr)  # fmt: skip
    if not found:
        print("no request has both a live and a shadow evaluation yet", file=sys.stderr)
        return 1
    rows = report(found)
    if args.json:
        for row in rows:
            print(orjson.dumps(row.__dict__).decode())
        return 0
    print(f"{len(found)} requests: {rows[0].primary_model} (live) vs {rows[0].shadow_model}")
    print("\n| metric | pairs | live | shadow | delta | 95% interval | shadow wins |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.metric} | {r.pairs} | {_num(r.primary)} | {_num(r.shadow)} | "
            f"{_num(r.delta, signed=True)} | [{_num(r.low)}, {_num(r.high)}] | "
            f"{'-' if r.win_rate is None else f'{r.win_rate:.0%}'} |"
        )
    return 0


def _num(v: float | None, *, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def cmd_replay(args: argparse.Namespace, settings: KafkaSettings) -> int:
    from tqdm import tqdm

    from kllm.ops.export import parse_when, read_topic
    from kllm.ops.replay import replay
    from schemas import InferenceJob
    from services.shadow import Settings as ShadowSettings
    from services.shadow import build

    since = parse_when(args.since)
    until = parse_when(args.until) if args.until else None
    if until is not None and until <= since:
        raise ConfigError("--until is not after --since")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    overrides: dict[str, Any] = {"shadow_model": args.model, "pool": args.pool}
    if args.template:
        overrides["shadow_template"] = args.template
    bootstrap = settings.bootstrap()
    shadow, capacity = build(ShadowSettings(**overrides))
    skipped: list[str] = []
    topic = inference_topic(args.pool).name
    jobs = read_topic(bootstrap, topic, InferenceJob, None, skipped.append,
                      since=since, until=until)  # fmt: skip
    with tqdm(unit="job", desc=f"replaying through {shadow.model}", file=sys.stderr) as bar:
        done = asyncio.run(replay(jobs, shadow, bootstrap, capacity, args.limit, bar.update))
    print(
        f"{done.answered} shadow generations from {done.read} jobs ({done.failed} failed, "
        f"{done.skipped} skipped)"
    )
    for reason in skipped[:5]:
        print(f"skipped unreadable job {reason}", file=sys.stderr)
    return 0 if done.failed == 0 and done.skipped == 0 else 1
