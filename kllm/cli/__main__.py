"""``python -m kllm.cli``: the same as the ``kllm`` command."""

import sys

from kllm.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
