"""The drift stage's state as bytes: its detectors and its tenants' reference prompts.

Pickled, in a versioned envelope, and read back only from the stage's own run folder.
A file of another version, or not a checkpoint at all, is a ConfigError naming it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from kllm.core.errors import ConfigError
from processors.drift import DriftMonitor, PromptReference

VERSION = 1
State = tuple[DriftMonitor, PromptReference]


def dumps(state: State) -> bytes:
    monitor, reference = state
    return pickle.dumps({"version": VERSION, "monitor": monitor, "reference": reference})


def loads(body: bytes, origin: Path) -> State:
    try:
        saved = pickle.loads(body)  # our own file, in the run folder
        version = saved.get("version") if isinstance(saved, dict) else None
        monitor, reference = (saved["monitor"], saved["reference"]) if version else (0, 0)
    except Exception as exc:
        raise ConfigError(f"cannot read the drift checkpoint {origin}: {exc!r}") from exc
    if (
        version != VERSION
        or not isinstance(monitor, DriftMonitor)
        or not isinstance(reference, PromptReference)
    ):
        raise ConfigError(f"{origin} is from another version, or not a checkpoint; move it away")
    return monitor, reference
