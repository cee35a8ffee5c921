"""`kllm scale STAGE N`: change how many processes of a stage a running `kllm up` runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import orjson
from pydantic_settings import BaseSettings, SettingsConfigDict

from kllm.core.errors import PipelineError
from kllm.core.stage_status import STATUS_FILE, read_status
from kllm.runtime.settings import KafkaSettings
from topics import GROUPLESS, STAGES, primary_group

GATEWAY_MAX = 16


class StoreSettings(BaseSettings):
    """The one retrieval setting scaling depends on, read alone: an unrelated bad
    setting of the retrieval stage must not break `kllm scale`."""

    model_config = SettingsConfigDict(env_prefix="KLLM_", frozen=True, extra="ignore")

    qdrant_url: str = ""


def max_replicas(stage: str, qdrant_server: bool) -> tuple[int, str]:
    """How many processes of ``stage`` can do work, and why no more: the declared
    group the stage scales by (topics.groups) caps it at its inputs' partitions."""
    if stage == "retrieval" and not qdrant_server:
        return 1, "embedded Qdrant is opened by one process; set KLLM_QDRANT_URL to scale"
    if stage in GROUPLESS:
        return GATEWAY_MAX, "replicas share the port; more than the cores rarely helps"
    group = primary_group(stage)
    if group.single_replica:
        return 1, group.single_replica
    topics = ", ".join(group.topic_names)
    n = group.max_replicas
    return n, f"{group.name} reads {topics}; the fewest partitions among them: {n}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "scale",
        help="run N processes of a stage (in its consumer group) in the running `kllm up`",
    )
    p.add_argument("stage", choices=STAGES, help="the stage")
    p.add_argument("replicas", type=int, help="processes wanted (0 pauses the stage)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")


def cmd_scale(args: argparse.Namespace, settings: KafkaSettings) -> int:
    run_dir = settings.run_dir
    # `kllm up` rewrites its status twice a second: an old file is a pipeline that died.
    if read_status(run_dir / STATUS_FILE) is None:
        raise PipelineError(f"no running pipeline in {run_dir}: start it with `kllm up`")
    cap, why = max_replicas(args.stage, bool(StoreSettings().qdrant_url))
    if not 0 <= args.replicas <= cap:
        raise PipelineError(f"{args.stage} runs 0 to {cap} processes: {why}")
    request = run_dir / "control" / f"scale-{args.stage}.json"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_bytes(orjson.dumps({"stage": args.stage, "replicas": args.replicas}))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        ready = _ready(run_dir, args.stage)
        if not request.exists() and len(ready) == args.replicas:
            print(f"{args.stage}: {args.replicas} ready ({', '.join(ready) or 'none running'})")
            return 0
        time.sleep(0.5)
    print(f"{args.stage}: not {args.replicas} ready after {args.timeout:.0f}s (see the logs)")
    return 1


def _ready(run_dir: Path, stage: str) -> list[str]:
    status = read_status(run_dir / STATUS_FILE)
    if status is None:
        return []
    return [
        f"{p.name} pid {p.pid}"
        for p in status.processes
        if p.stage == stage and p.state == "running"
    ]
