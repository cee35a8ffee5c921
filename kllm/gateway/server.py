"""The gateway's listening socket and its uvicorn server."""

from __future__ import annotations

import asyncio
import logging
import socket

from kllm.core.errors import ConfigError
from kllm.gateway.config import STAGE, ServerConfig
from kllm.gateway.routes import make_app
from kllm.gateway.service import Gateway
from kllm.runtime.ready import mark_ready

log = logging.getLogger(__name__)


def listening_socket(config: ServerConfig) -> socket.socket:
    """SO_REUSEPORT: several gateway replicas on one host share the port, and the
    kernel spreads connections across them."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says it is TCP; without it every response waited ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"gateway cannot listen on {config.host}:{config.port}: {exc} (set KLLM_GATEWAY_PORT)"
        ) from exc
    sock.listen(1024)
    return sock


async def serve(config: ServerConfig, gw: Gateway) -> None:
    """Serve until stopped; the ready file is written once the server listens."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            make_app(gw),
            host=config.host,
            port=config.port,
            timeout_keep_alive=config.keep_alive_s,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve(sockets=[listening_socket(config)]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        mark_ready(config.ready_file)
        log.info("gateway listening", extra={"port": config.port, "stage": STAGE})
    await task
