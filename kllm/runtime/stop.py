"""Stop handling, the same in every runner: SIGTERM or SIGINT asks the loop to stop
after the records in hand; the runner then publishes, commits and closes."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Protocol


class StopFlag(Protocol):
    """What a loop checks: :class:`Stop`, or an ``asyncio.Event`` or ``threading.Event``."""

    def is_set(self) -> bool: ...


class Stop:
    """Set by a signal (after ``install()``) or by ``set()``; loops check ``is_set()``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> Stop:
        """Handle SIGTERM and SIGINT in this (the main) thread."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
