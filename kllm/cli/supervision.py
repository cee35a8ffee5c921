"""What `kllm up` says and does about crashed stages: its restart flags, the lines it
prints as the supervisor restarts or gives up on a process, and its ticks."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kllm.ops.supervisor import Change, Supervisor


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"wants 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"wants more than 0, got {value}")
    return value


def add_flags(up: argparse.ArgumentParser) -> None:
    up.add_argument(
        "--restart-budget",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help=(
            "crashes a stage process may have within --restart-window; one more and it is "
            "marked failed and left stopped while the other stages keep running. Restarts "
            "back off: the first at once, then about 1, 2, 4 ... s, at most "
            "KLLM_RESTART_BACKOFF_MAX_S (default: KLLM_RESTART_BUDGET or 5)"
        ),
    )
    up.add_argument(
        "--restart-window",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="the sliding window of --restart-budget (default: KLLM_RESTART_WINDOW_S or 300)",
    )


def restart_env(args: argparse.Namespace) -> dict[str, str]:
    """The flags given, as the supervisor's settings (ChildSettings) read them."""
    env = {}
    if args.restart_budget is not None:
        env["KLLM_RESTART_BUDGET"] = str(args.restart_budget)
    if args.restart_window is not None:
        env["KLLM_RESTART_WINDOW_S"] = str(args.restart_window)
    return env


def say(change: Change) -> None:
    print(textwrap.indent(change.text, "  "), flush=True)


def ready_line(sup: Supervisor, seconds: float) -> str:
    """``pipeline ready in ...``, naming the processes that failed on the way."""
    line = f"pipeline ready in {seconds:.1f}s"
    failed = [sp.name for sp in sup.procs if sp.failed]
    if failed:
        line += f" without {', '.join(failed)} (failed; the other stages run)"
    return line


def tick(sup: Supervisor) -> None:
    """Restart crashed stages on their backoff, apply scale requests, write the status."""
    for change in sup.supervise():
        say(change)
    for line in sup.apply_scale_requests():
        print(f"  {line}", flush=True)
