"""Whether the gateway can keep its promises: its producer and its reply router both
reach the broker. A thread asks the broker for the request topic's metadata through
each client every few seconds; /healthz reports the last answers, and a replica whose
clients cannot reach the broker is not ready (it could only answer 503 or 504)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Probe = Callable[[float], bool]
"""Asks the broker something with a timeout in seconds: whether it answered."""


class Health:
    def __init__(self, probes: Mapping[str, Probe], every_s: float) -> None:
        self._probes = dict(probes)
        self.every_s = every_s
        self._ok = dict.fromkeys(self._probes, True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(self.every_s + 2.0)

    def status(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._ok)

    def probe_once(self) -> None:
        for name, probe in self._probes.items():
            ok = probe(max(0.5, self.every_s))
            with self._lock:
                changed, self._ok[name] = self._ok[name] != ok, ok
            if changed:
                log.warning("health changed", extra={"client": name, "ok": ok})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe_once()
            self._stop.wait(self.every_s)
