"""The ready file: how a stage tells its supervisor it is about to consume."""

from __future__ import annotations

import os
from pathlib import Path


def mark_ready(path: str) -> None:
    """In a stage: tell the supervisor (which passed ``path``) that it is about to consume."""
    if path:
        Path(path).write_text(str(os.getpid()))
