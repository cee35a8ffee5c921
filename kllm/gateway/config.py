"""What the gateway takes from its settings, as plain values: the Settings class lives
in services/gateway.py, which this package may not import (the layers point down)."""

from __future__ import annotations

from dataclasses import dataclass

STAGE = "gateway"
DEFAULT_POOL = "default"


@dataclass(frozen=True)
class GatewayConfig:
    bootstrap: str
    """Kafka bootstrap servers, for the dashboard's monitor."""
    models: tuple[str, ...]
    """Model names callers may ask for."""
    max_waiting: int
    """Callers (waiting or streaming) at once; beyond that: 429 with Retry-After."""
    retry_after_s: int
    timeout_s: float
    """The request's deadline; past it the caller gets 504."""
    max_body_bytes: int
    replay_ttl_s: float
    """How long an answer is kept for a caller repeating its Idempotency-Key (0: never)."""
    publish_timeout_s: float = 5.0
    """How long a publish waits for the broker's acknowledgement (within the request's
    deadline); past it the caller gets 503."""
    health_interval_s: float = 2.0
    """How often the producer and the reply router are checked against the broker (0: never)."""
    pools: tuple[str, ...] = ()
    """The inference pools (KLLM_INFERENCE_POOLS): the dashboard shows their groups too."""
    model_pools: tuple[tuple[str, str], ...] = ()
    """Model -> the inference pool that serves it; unlisted: the default pool."""
    status_file: str = ""
    """The supervisor's status file (kllm.gateway.stages); empty: none is read."""


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    keep_alive_s: int
    ready_file: str
    """Written once the server listens (empty: none)."""


def pool_of(config: GatewayConfig, model: str) -> str:
    return dict(config.model_pools).get(model, DEFAULT_POOL)
