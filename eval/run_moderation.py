"""Precision and recall of output moderation, per check, on a labelled set of answers.

Builds the moderation stage's real checks (the profanity classifier, presidio PII
redaction, the repository's policies and the prompt templates, configured by the
stage's own settings, so ``KLLM_*`` variables apply), moderates every example of
``eval/moderation.jsonl``, and compares what was flagged with the human labels:

- toxicity, pii, policy, echo: the label against ``Moderated.flagged(check)``;
- any: some label is true (the answer should be blocked or redacted) against a
  verdict other than "allowed".

A blocked answer is never redacted, so its pii and redact-policy checks do not run;
the ``fn_blk`` column counts the misses on answers that were blocked anyway
(nothing leaked). The report is not a gate: the exit status is 0 unless the data
file is malformed (2, naming each bad line) or the checks cannot be built (1).

    python eval/run_moderation.py [--data eval/moderation.jsonl] [--json metrics.json]

Each line of the data file is a JSON object: "id", "text", "tenant", "template" (a tag
such as "rag@v1/a", or null), "labels" ({"toxicity", "pii", "policy", "echo"}: bools),
"note", and optionally "prompt" and "injection_flagged" (the request's prompt and
whether ingestion flagged it as a likely injection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kllm.core.errors import ConfigError
from processors.moderation import CHECKS, Context, Moderated, OutputModerator
from processors.policies import load_policies
from processors.templates import load_templates
from services.moderation import Settings

DATA = Path("eval/moderation.jsonl")
ROWS = (*CHECKS, "any")
_Kinds = type | tuple[type, ...]
REQUIRED: dict[str, _Kinds] = {
    "id": str,
    "text": str,
    "tenant": str,
    "template": (str, type(None)),
    "note": str,
}
OPTIONAL: dict[str, _Kinds] = {"prompt": (str, type(None)), "injection_flagged": bool}


class DataError(Exception):
    """The data file is malformed; the message names every bad line."""


@dataclass(frozen=True)
class Example:
    line: int
    id: str
    text: str
    context: Context
    labels: dict[str, bool]
    note: str

    @property
    def expected_any(self) -> bool:
        return any(self.labels.values())


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    fn_blocked: int = 0

    @property
    def support(self) -> int:
        return self.tp + self.fn

    @property
    def precision(self) -> float | None:
        flagged = self.tp + self.fp
        return self.tp / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.support if self.support else None


def load(path: Path, system_prompt: Callable[[str], str]) -> list[Example]:
    """Every example in ``path``; raises ``DataError`` listing every malformed line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    examples: list[Example] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            example = parse(n, raw, system_prompt)
        except ValueError as exc:
            errors.append(f"{path}:{n}: {exc}")
            continue
        if example.id in seen:
            errors.append(
                f"{path}:{n}: duplicate id {example.id!r} (first on line {seen[example.id]})"
            )
        seen.setdefault(example.id, n)
        examples.append(example)
    if not examples and not errors:
        errors.append(f"{path}: no examples")
    if errors:
        raise DataError("\n".join(errors))
    return examples


def parse(n: int, raw: str, system_prompt: Callable[[str], str]) -> Example:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [key for key in (*REQUIRED, "labels") if key not in obj]
    if missing:
        raise ValueError(f"missing keys {missing}")
    unknown = sorted(obj.keys() - {*REQUIRED, *OPTIONAL, "labels"})
    if unknown:
        raise ValueError(f"unknown keys {unknown}")
    for key, kinds in (REQUIRED | OPTIONAL).items():
        if key in obj and not isinstance(obj[key], kinds):
            raise ValueError(f"{key!r} has the wrong type ({type(obj[key]).__name__})")
    if not obj["id"].strip() or not obj["tenant"].strip():
        raise ValueError("'id' and 'tenant' must not be empty")
    if not obj["text"].strip():
        raise ValueError("'text' must not be empty")
    labels = obj["labels"]
    if not isinstance(labels, dict) or set(labels) != set(CHECKS):
        got = sorted(labels) if isinstance(labels, dict) else type(labels).__name__
        raise ValueError(f"'labels' must have exactly the keys {list(CHECKS)}, got {got}")
    bad = sorted(k for k, v in labels.items() if not isinstance(v, bool))
    if bad:
        raise ValueError(f"labels {bad} must be true or false")
    system = None
    if obj["template"] is not None:
        try:
            system = system_prompt(obj["template"])
        except ConfigError as exc:
            raise ValueError(f"template: {exc}") from exc
    context = Context(
        tenant=obj["tenant"],
        system_prompt=system,
        prompt=obj.get("prompt"),
        injection_flagged=obj.get("injection_flagged", False),
    )
    return Example(n, obj["id"], obj["text"], context, dict(labels), obj["note"])


def build_checks(settings: Settings) -> tuple[OutputModerator, dict[str, Any]]:
    """The checks as the moderation stage builds them (services/moderation.py)."""
    from kllm.adapters.guardrails.pii import PresidioRedactor
    from kllm.adapters.guardrails.profanity import ProfanityClassifier

    entities = list(settings.output_pii_entities)
    policies = load_policies(settings.policies_dir)
    checks = OutputModerator(
        ProfanityClassifier(),
        PresidioRedactor(entities) if entities else None,
        policies,
        toxicity_block_at=settings.profanity_threshold,
        echo_min_words=settings.echo_min_words,
    )
    config = {
        "toxicity_block_at": settings.profanity_threshold,
        "pii_entities": entities,
        "policies": f"{settings.policies_dir}/v{policies.version}.toml",
        "echo_min_words": settings.echo_min_words,
    }
    return checks, config


def score(
    examples: list[Example], results: list[Moderated]
) -> tuple[dict[str, Tally], dict[str, list[str]], dict[str, list[str]]]:
    tallies = {row: Tally() for row in ROWS}
    false_pos: dict[str, list[str]] = {row: [] for row in ROWS}
    false_neg: dict[str, list[str]] = {row: [] for row in ROWS}
    for example, result in zip(examples, results, strict=True):
        for row in ROWS:
            if row == "any":
                want, got = example.expected_any, result.verdict != "allowed"
            else:
                want, got = example.labels[row], result.flagged(row)
            tally = tallies[row]
            if want and got:
                tally.tp += 1
            elif got:
                tally.fp += 1
                false_pos[row].append(example.id)
            elif want:
                tally.fn += 1
                tally.fn_blocked += result.verdict == "blocked"
                false_neg[row].append(example.id)
            else:
                tally.tn += 1
    return tallies, false_pos, false_neg


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(
    tallies: dict[str, Tally],
    false_pos: dict[str, list[str]],
    false_neg: dict[str, list[str]],
    n: int,
    seconds: float,
    config: dict[str, Any],
    show: int,
) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    out = [f"config: {settings}", ""]
    head = f"{'check':<9}{'support':>8}{'tp':>6}{'fp':>6}{'fn':>6}{'fn_blk':>8}"
    out.append(f"{head}{'precision':>11}{'recall':>8}")
    for row in ROWS:
        t = tallies[row]
        line = f"{row:<9}{t.support:>8}{t.tp:>6}{t.fp:>6}{t.fn:>6}{t.fn_blocked:>8}"
        out.append(f"{line}{fmt(t.precision):>11}{fmt(t.recall):>8}")
    rate = n / seconds if seconds > 0 else float("inf")
    out += ["", f"examples: {n}   run time: {seconds:.2f} s   {rate:.1f} examples/s", ""]
    out.append(f"misclassified ids (up to {show} each; fn_blk: missed but blocked anyway):")
    for row in ROWS:
        for kind, ids in (("false positives", false_pos[row]), ("false negatives", false_neg[row])):
            if ids:
                more = f" (+{len(ids) - show} more)" if len(ids) > show else ""
                out.append(f"  {row:<9}{kind}: {', '.join(ids[:show])}{more}")
    return "\n".join(out)


def metrics_json(
    tallies: dict[str, Tally],
    false_pos: dict[str, list[str]],
    false_neg: dict[str, list[str]],
    n: int,
    seconds: float,
    config: dict[str, Any],
    data: Path,
) -> dict[str, Any]:
    return {
        "data": str(data),
        "examples": n,
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "config": config,
        "checks": {
            row: {
                "support": t.support,
                "tp": t.tp,
                "fp": t.fp,
                "fn": t.fn,
                "tn": t.tn,
                "fn_blocked": t.fn_blocked,
                "precision": t.precision,
                "recall": t.recall,
                "false_positives": false_pos[row],
                "false_negatives": false_neg[row],
            }
            for row, t in tallies.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Moderate every labelled answer in the evaluation set with the moderation stage's "
            "real checks (its settings, so KLLM_* variables apply) and report precision and "
            "recall per check. Run from the repository root."
        ),
        epilog=(
            "rows: toxicity, pii, policy, echo (label vs. a finding of that check) and any "
            "(some label true, i.e. should be blocked or redacted, vs. a verdict other than "
            "allowed). columns: support (labelled positives), tp, fp, fn, fn_blk (misses on "
            "answers blocked for another reason: a blocked answer is never redacted, so its "
            "pii check does not run), precision, recall. Exit status 0 (a report, not a gate), "
            "2 when the data file is malformed (every bad line is named), 1 when the checks "
            "cannot be built."
        ),
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help=f"labelled examples, JSON lines (default {DATA})"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the metrics here")
    parser.add_argument(
        "--show", type=int, default=10, metavar="N", help="misclassified ids listed per check"
    )
    args = parser.parse_args(argv)

    settings = Settings()
    try:
        # Data first: a malformed file fails before the models load.
        examples = load(args.data, load_templates(settings.templates_dir).render)
        loaded = time.perf_counter()
        checks, config = build_checks(settings)
        load_s = time.perf_counter() - loaded
    except DataError as exc:
        print(f"evaluation data rejected:\n{exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"cannot build the moderation checks: {exc}", file=sys.stderr)
        return 1
    config["model_load_s"] = round(load_s, 2)

    start = time.perf_counter()
    results = [checks.moderate(e.text, e.context) for e in examples]
    seconds = time.perf_counter() - start

    tallies, false_pos, false_neg = score(examples, results)
    print(f"{args.data}: output moderation, per check")
    print(report(tallies, false_pos, false_neg, len(examples), seconds, config, args.show))
    if args.json is not None:
        metrics = metrics_json(
            tallies, false_pos, false_neg, len(examples), seconds, config, args.data
        )
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"\nmetrics written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
