"""The ``kllm`` command: the top layer, the only one besides ops that may import services."""

from kllm.cli.commands import main

__all__ = ["main"]
