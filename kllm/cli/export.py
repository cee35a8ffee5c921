"""`kllm export-dataset`: the enriched feedback as a JSONL or Parquet dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kllm.runtime.settings import KafkaSettings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export-dataset",
        help="write rated answers (the enriched feedback topic) as JSONL or Parquet",
        description=(
            "Reads the enriched feedback topic from its start to its current end, keeps the "
            "latest rating per request, filters, and writes OUT: .jsonl gives chat-format rows "
            "(messages, rating, label, comment, metadata) for fine-tuning or evaluation; "
            ".parquet gives one flat column per field. Times are ISO 8601 or ages (30m, 24h, 7d)."
        ),
    )
    p.add_argument("out", type=Path, help="output file, ending in .jsonl or .parquet")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--model", help="only answers of this model")
    p.add_argument("--since", help="feedback at or after this time (e.g. 7d, 2026-11-01)")
    p.add_argument("--until", help="feedback before this time")
    p.add_argument("--min-rating", type=int, default=1, choices=range(1, 6), metavar="1-5")
    p.add_argument("--max-rating", type=int, default=5, choices=range(1, 6), metavar="1-5")
    p.add_argument(
        "--include-orphans", action="store_true", help="keep feedback that joined nothing"
    )


def cmd_export(args: argparse.Namespace, settings: KafkaSettings) -> int:
    from tqdm import tqdm

    from kllm.core.errors import ConfigError
    from kllm.ops.export import Filter, latest_per_request, parse_when, read_enriched, write

    if args.out.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"{args.out}: the file name must end in .jsonl or .parquet")
    if args.min_rating > args.max_rating:
        raise ConfigError("--min-rating is above --max-rating")
    keep = Filter(
        tenant=args.tenant,
        model=args.model,
        since=parse_when(args.since) if args.since else None,
        until=parse_when(args.until) if args.until else None,
        min_rating=args.min_rating,
        max_rating=args.max_rating,
        orphans=args.include_orphans,
    )
    unreadable: list[str] = []
    with tqdm(unit="rec", desc="reading feedback", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        records = read_enriched(settings.bootstrap(), progress, unreadable.append)
        kept = latest_per_request(r for r in records if keep.matches(r))
    write(kept, args.out)
    print(f"{len(kept)} rated answers written to {args.out}")
    for reason in unreadable[:5]:
        print(f"skipped unreadable record {reason}", file=sys.stderr)
    return 0
