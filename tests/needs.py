"""What a test needs from the machine: skipped on a developer's machine without it,
a failure under CI=true (CI installs everything; a missing part is a broken set-up)."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def executable(name: str, how: str) -> str:
    """The path of ``name``; ``how`` says how to install it."""
    path = shutil.which(name)
    if path is not None:
        return path
    missing(f"{name} is not installed ({how})")


def missing(reason: str) -> NoReturn:
    """Skip for ``reason``, or fail under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true a missing dependency fails the test")
    pytest.skip(reason)
