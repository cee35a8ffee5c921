"""The golden set through the real pipeline and model: `make eval`.

Starts `kllm up` as a user would (every stage its own process, the embedded broker,
Qdrant Edge with the docs/ corpus, xllamacpp with SmolLM2), in a fresh run folder with
the response cache off, waits until it is ready, runs `kllm eval run` on the golden set,
prints its table, and stops the pipeline. ``--env NAME=VALUE`` runs a variant (say
``KLLM_TOP_K=0``); ``--compare RUN`` then gates it on a baseline run with
`kllm eval compare` (exit 1 on a regression).

    python eval/run_golden.py [--golden eval/golden.jsonl] [--limit N] [--out DIR]
                              [--env KLLM_TOP_K=3 ...] [--compare BASELINE_RUN]

Time limit: the whole run ends within --limit-s (default 1500 s); a run cut short by it
is reported, writes no scores, and exits 1. Each run writes to its own folder (--out,
default .kllm/eval/<time>), so a baseline is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "pipeline ready in"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--golden", type=Path, default=REPO / "eval" / "golden.jsonl")
    p.add_argument("--out", type=Path, help="the run's folder (default .kllm/eval/<time>)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--label", default="", help="a name for the run")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--compare", type=Path, help="a baseline run to gate this one on")
    p.add_argument("--limit-s", type=float, default=1500.0)
    args = p.parse_args()
    args.out = args.out or REPO / ".kllm" / "eval" / time.strftime("%Y%m%dT%H%M%S")
    if args.compare and args.compare.resolve() == args.out.resolve():
        p.error("--compare names the folder this run writes to: give --out another")
    extra = dict(item.partition("=")[::2] for item in args.env)
    if any(not k.startswith("KLLM_") for k in extra):
        p.error("--env takes KLLM_ settings only, as NAME=VALUE")
    deadline = time.monotonic() + args.limit_s
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: the pipeline is stopped below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="kllm-eval-") as tmp:
        env = (
            os.environ
            | {
                "KLLM_RUN_DIR": tmp,
                "KLLM_QDRANT_PATH": str(Path(tmp) / "qdrant"),
                "KLLM_SEED_DIR": str(REPO / "docs"),
                "KLLM_BROKER_STORAGE": "memory",  # nothing to keep: each run starts afresh
                "KLLM_CACHE": "false",  # every answer generated, with its passages
            }
            | extra
        )
        env.pop("KLLM_BOOTSTRAP_SERVERS", None)
        said = Path(tmp) / "up.log"  # a file, not a pipe: nobody has to keep reading it
        with said.open("w") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "kllm.cli", "up"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            if not _ready(up, said, deadline):
                print("the pipeline did not become ready in time", file=sys.stderr)
                return 1
            code = _evaluate(args, env, deadline)
            if code == 0 and args.compare:
                code = subprocess.call(
                    [sys.executable, "-m", "kllm.cli", "eval", "compare", str(args.compare),
                     str(args.out)], cwd=REPO, env=env,
                )  # fmt: skip
            return code
        finally:
            _stop(up)


def _ready(up: subprocess.Popen[bytes], said: Path, deadline: float) -> bool:
    print("starting the pipeline (kllm up)...", file=sys.stderr, flush=True)
    while time.monotonic() < deadline and up.poll() is None:
        ready = [x for x in said.read_text(errors="replace").splitlines() if x.startswith(READY)]
        if ready:
            print(ready[0], file=sys.stderr, flush=True)
            return True
        time.sleep(0.5)
    print(said.read_text(errors="replace")[-3000:], file=sys.stderr)
    return False


def _evaluate(args: argparse.Namespace, env: dict[str, str], deadline: float) -> int:
    argv = [sys.executable, "-m", "kllm.cli", "eval", "run", str(args.golden), "--out",
            str(args.out), "--label", args.label or ",".join(args.env) or "defaults"]  # fmt: skip
    argv += ["--limit", str(args.limit)] if args.limit else []
    try:
        return subprocess.run(
            argv, cwd=REPO, env=env, timeout=deadline - time.monotonic()
        ).returncode
    except subprocess.TimeoutExpired:
        print("time limit: the evaluation was stopped", file=sys.stderr)
        return 1


def _stop(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)  # Ctrl-C: kllm up stops every stage, then the broker
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


if __name__ == "__main__":
    sys.exit(main())
