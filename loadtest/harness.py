"""What every benchmark starts from: an embedded broker, the topics, and stage processes."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from kllm.ops.broker import EmbeddedBroker, free_port
from kllm.ops.supervisor import STAGES, Supervisor
from kllm.runtime.kafka import ConfluentTopicAdmin
from topics import ALL, provision

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "free_port", "pct", "running", "supervised"]


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def running(stages: Sequence[str] = STAGES, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the bootstrap address once ``stages`` consume; stop everything after."""
    with supervised(stages, env) as (bootstrap, _sup):
        yield bootstrap


@contextmanager
def supervised(
    stages: Sequence[str] = STAGES, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, Supervisor]]:
    """As ``running``, with the supervisor too (to kill and restart stages)."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        run_dir = Path(tmp)
        provision(ConfluentTopicAdmin(broker.bootstrap), ALL)
        base = {
            "KLLM_BOOTSTRAP_SERVERS": broker.bootstrap,
            "KLLM_RUN_DIR": str(run_dir),
            "KLLM_QDRANT_PATH": str(run_dir / "qdrant"),
            "KLLM_SEED_DIR": str(REPO / "docs"),
            "KLLM_LOG_LEVEL": os.environ.get("KLLM_LOG_LEVEL", "WARNING"),
            "KLLM_GATEWAY_PORT": str(free_port()),
            # Benchmarks measure the pipeline, not the response cache, unless they say so.
            "KLLM_CACHE": "false",
        }
        sup = Supervisor(run_dir, base | dict(env or {}), stages=stages)
        sup.start_all()
        try:
            t0 = time.monotonic()
            sup.wait_ready(240, bootstrap=broker.bootstrap)
            print(f"{', '.join(stages)} ready in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            yield broker.bootstrap, sup
        finally:
            sup.stop_all()
