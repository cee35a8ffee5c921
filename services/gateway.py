"""Gateway: the OpenAI chat completions API in front of the request topic.

A caller's key names its tenant; the request is published to the request topic
and the caller waits for its reply, which the reply router brings back by
request id to whichever replica holds the connection. The gateway itself lives
in kllm/gateway (service, routes, server); this file holds its settings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from confluent_kafka import Producer
from pydantic import Field

from kllm.core.stage_status import STATUS_FILE
from kllm.gateway.config import STAGE, GatewayConfig, ServerConfig
from kllm.gateway.keys import KeyStore
from kllm.gateway.recent import RecentAnswers
from kllm.gateway.replies import ReplyRouter
from kllm.gateway.server import serve
from kllm.gateway.service import Gateway
from kllm.runtime import logs, tracing
from kllm.runtime.kafka import make_producer
from kllm.runtime.settings import StageSettings
from topics import EMBEDDINGS, MODERATED_TOKENS, RESPONSES


class Settings(StageSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_keys_file: Path | None = None
    """API keys (hashed); default: keys.json in the run folder (`kllm keys create`)."""
    gateway_models: list[str] = Field(default_factory=lambda: ["smollm2-135m"])
    """Model names callers may ask for (served by the inference pools)."""
    model_pools: dict[str, str] = Field(default_factory=dict)
    """Model -> inference pool (KLLM_MODEL_POOLS, as retrieval routes them); unlisted
    models are served by the default pool."""
    gateway_max_waiting: int = Field(default=64, ge=1)
    """Callers this replica lets wait at once; beyond that: 429 with Retry-After."""
    gateway_retry_after_s: int = Field(default=1, ge=1)
    gateway_keep_alive_s: int = Field(default=75, ge=1)
    """How long an idle client connection stays open. Longer than clients' pools keep
    idle connections, so a client rarely sends on a connection the server is closing."""
    gateway_timeout_s: float = Field(default=60.0, gt=0)
    """The request's deadline: past it the pipeline gives up and the caller gets 504."""
    gateway_max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    gateway_replay_ttl_s: float = Field(default=600.0, ge=0)
    """How long an answer is kept for a caller repeating its Idempotency-Key."""
    gateway_replay_max: int = Field(default=10_000, ge=1)
    """Answers to Idempotency-Key requests each replica keeps at most."""
    gateway_replay_warm: int = Field(default=2_000, ge=0)
    """Responses per partition a starting replica reads back, so it can answer a retry
    whose answer was given before it started (0: none)."""
    gateway_publish_timeout_s: float = Field(default=5.0, gt=0)
    """How long a publish waits for the broker's acknowledgement (never past the
    request's deadline); past it the caller gets 503. Also the producer's
    message.timeout.ms, so the record is given up on too."""
    gateway_health_interval_s: float = Field(default=2.0, ge=0)
    """How often /healthz's view of the producer and the reply router is refreshed."""

    def keys_path(self) -> Path:
        return self.gateway_keys_file or self.run_dir / "keys.json"

    def gateway(self) -> GatewayConfig:
        return GatewayConfig(
            bootstrap=self.bootstrap(),
            models=tuple(self.gateway_models),
            max_waiting=self.gateway_max_waiting,
            retry_after_s=self.gateway_retry_after_s,
            timeout_s=self.gateway_timeout_s,
            max_body_bytes=self.gateway_max_body_bytes,
            replay_ttl_s=self.gateway_replay_ttl_s,
            publish_timeout_s=self.gateway_publish_timeout_s,
            health_interval_s=self.gateway_health_interval_s,
            pools=tuple(self.inference_pools),
            model_pools=tuple(sorted(self.model_pools.items())),
            status_file=str(self.run_dir / STATUS_FILE),
        )

    def server(self) -> ServerConfig:
        return ServerConfig(
            host=self.gateway_host,
            port=self.gateway_port,
            keep_alive_s=self.gateway_keep_alive_s,
            ready_file=self.ready_file,
        )


def build(
    settings: Settings,
    *,
    producer: Producer | None = None,
    router: ReplyRouter | None = None,
    keys: KeyStore | None = None,
) -> Gateway:
    bootstrap = settings.bootstrap()
    if producer is None:
        producer = make_producer(bootstrap, producer_config(settings))
    recent = RecentAnswers(settings.gateway_replay_ttl_s, settings.gateway_replay_max)
    if router is None:
        fetch = {"fetch.wait.max.ms": settings.consumer_config()["fetch.wait.max.ms"]}
        # Moderated windows only: the raw token topic never reaches a caller.
        router = ReplyRouter(
            bootstrap,
            [RESPONSES, MODERATED_TOKENS, EMBEDDINGS],
            fetch,
            recent,
            settings.gateway_replay_warm,
        )
    keys = keys or KeyStore(settings.keys_path())
    return Gateway(settings.gateway(), keys, producer, router, recent)


def producer_config(settings: Settings) -> dict[str, str | int | bool]:
    """The stages' producer settings, giving up on a record after the publish timeout
    (librdkafka's default, 300 s, would keep a caller waiting through an outage)."""
    timeout_ms = max(1, round(settings.gateway_publish_timeout_s * 1000))
    return settings.producer_config() | {"message.timeout.ms": timeout_ms}


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    tracing.configure(STAGE, settings.trace_export, settings.run_dir)
    asyncio.run(serve(settings.server(), build(settings)))


if __name__ == "__main__":
    main()
