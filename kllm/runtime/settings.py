"""Settings shared by every process. Each service extends :class:`KafkaSettings`.

Values come from ``KLLM_*`` environment variables, read only when a service's
``main()`` builds its settings object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kllm.core.errors import ConfigError

STATE_FILE = "state.json"
PROJECT_DIR = Path(__file__).resolve().parents[2]
"""The project's folder: the default prompts/, policies/ and docs/ are found from it, so
``kllm`` works from any working directory. An installed copy (the image) sets the paths."""
PROMPTS_DIR = PROJECT_DIR / "prompts"
POLICIES_DIR = PROJECT_DIR / "policies" / "moderation"
DOCS_DIR = PROJECT_DIR / "docs"


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLLM_", frozen=True, extra="ignore")

    bootstrap_servers: str = ""
    """Kafka bootstrap address. Empty: use the embedded broker that `kllm up` started."""
    run_dir: Path = Path(".kllm")
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1500
    fetch_wait_max_ms: int = 20
    max_poll_interval_ms: int = 30000
    """Also the rebalance timeout: how long a rebalance waits for a member that died
    while joining. Stages poll between short records, so 30 s is ample."""
    log_level: str = "INFO"
    trace_export: Literal["none", "file", "otlp"] = "none"
    """Where OpenTelemetry spans go: nowhere (the trace context still passes through),
    JSON lines under ``<run_dir>/traces`` (see `kllm trace`), or OTLP/HTTP to
    OTEL_EXPORTER_OTLP_ENDPOINT."""
    inference_pools: list[str] = Field(default_factory=list)
    """Extra inference pools, each with its own job topic (see topics.inference_topic)."""

    def bootstrap(self) -> str:
        if self.bootstrap_servers:
            return self.bootstrap_servers
        state = self.run_dir / STATE_FILE
        try:
            return str(orjson.loads(state.read_bytes())["bootstrap_servers"])
        except FileNotFoundError as exc:
            raise ConfigError(
                "no Kafka broker configured: set KLLM_BOOTSTRAP_SERVERS, "
                f"or start the embedded one with `kllm up` (no {state} found)"
            ) from exc
        except (KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"{state} is unreadable; remove it and rerun `kllm up`") from exc

    def consumer_config(self) -> dict[str, str | int | bool]:
        return {
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            "fetch.wait.max.ms": self.fetch_wait_max_ms,
            "max.poll.interval.ms": self.max_poll_interval_ms,
        }

    def producer_config(self) -> dict[str, str | int | bool]:
        return {"linger.ms": 1, "enable.idempotence": True, "acks": "all"}


def write_state(run_dir: Path, bootstrap_servers: str) -> Path:
    """Where the embedded broker listens, for the CLI's clients."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STATE_FILE
    state = {"bootstrap_servers": bootstrap_servers}
    path.write_bytes(orjson.dumps(state))
    return path


class StageSettings(KafkaSettings):
    """Settings every stage process has."""

    ready_file: str = ""
    """Written once the stage is about to consume; the supervisor waits for it."""
    commit_interval_s: float = 1.0
    metrics_port: int = 0
    """Prometheus /metrics of this process on this port; 0: none (kllm up numbers them
    from KLLM_METRICS_BASE_PORT when that is set)."""
    quix_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    torch_threads: int = Field(default=1, ge=0)
    """Threads torch uses for embeddings (retrieval, drift); 0: torch's default, one per
    core. One by default: the stages share the host, and torch's spinning worker threads
    took the cores the other stages needed (at 30 requests/s on 2 cores, end-to-end
    p50 762 ms with torch's default, 60 ms with one thread)."""
    state_dir: Path | None = None
    """Where this process keeps its keyed state (RocksDB); unset: ``<run_dir>/state/<stage>``.
    The supervisor gives each process its own; the state moves between processes through
    the changelog topics."""
    changelog_batch_messages: int = Field(default=1, ge=0)
    """Records per produce batch in the stages with keyed state (ingestion, moderation,
    feedback), whose producer also writes the state changelogs. 1 by default: the
    embedded broker reports a partition's end as its last batch's first offset + 1, so a
    changelog written in larger batches cannot be restored to its end (a restarted or
    newly assigned stage would stall or lose state). On Apache Kafka, 0 (librdkafka's
    default batching) is correct too, and faster."""

    def quix_producer_config(self) -> dict[str, str | int | bool]:
        config = self.producer_config()
        if self.changelog_batch_messages:
            config["batch.num.messages"] = self.changelog_batch_messages
        return config
