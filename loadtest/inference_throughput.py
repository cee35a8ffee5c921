"""Inference worker throughput versus the engine's own, measured in one run.

1. engine-direct: the CPU engine in this process, the job set run with N
   requests in flight (asyncio), completion tokens per second.
2. through Kafka: the embedded broker and one inference worker process
   (capacity N); the same jobs published to llm.inference at once, generations
   read from llm.generations; completion tokens per second from first publish
   to last generation.

The ratio of (2) to (1) is what the worker costs; the target is at least 0.9.

    python loadtest/inference_throughput.py --jobs 48 --concurrency 4 --max-tokens 32

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 900 s). Each measurement gets at most half of what is left; generations not
back by then are reported as lost (INCOMPLETE). Ctrl-C or SIGTERM stops every process it
started.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from harness import add_limit_arg, current, run_limited, running

from kllm.adapters.engines.xllama import XLlamaEngine
from kllm.runtime.kafka import TailReader, make_producer
from processors.inference import Finish
from schemas import Generation, InferenceJob, Request, RetrievalContext, decode, encode
from schemas.chat import ChatTurn
from topics import GENERATIONS, INFERENCE

PROMPTS = (
    "Explain what a message queue is.",
    "Describe a river in two sentences.",
    "Why do computers need memory?",
    "Give three uses of a hammer.",
    "What is the capital of France and why is it famous?",
    "Write a short note about Kafka topics.",
)

LIMIT_S = 900
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


def make_jobs(n: int, max_tokens: int) -> list[InferenceJob]:
    jobs = []
    for i in range(n):
        rid = f"tput-{uuid.uuid4()}"
        prompt = PROMPTS[i % len(PROMPTS)]
        jobs.append(
            InferenceJob(
                request=Request(request_id=rid, prompt=prompt, max_tokens=max_tokens),
                context=RetrievalContext(request_id=rid),
                messages=[ChatTurn(role="user", content=prompt)],
            )
        )
    return jobs


async def engine_direct(jobs: list[InferenceJob], concurrency: int) -> tuple[int, float]:
    engine = XLlamaEngine(n_parallel=concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(job: InferenceJob) -> int:
        async with gate:
            tokens = 0
            async for event in engine.stream(job.messages, job.request.max_tokens or 32):
                if isinstance(event, Finish):
                    tokens = event.usage.completion_tokens
            return tokens

    await one(jobs[0])  # warm-up, not counted
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(j)) for j in jobs]
    done, pending = await asyncio.wait(tasks, timeout=max(current().left() / 2, 1.0))
    elapsed = time.perf_counter() - t0
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    engine.close()
    if pending:
        print(f"engine-direct INCOMPLETE: {len(pending)} jobs unfinished at the time limit")
    return sum(t.result() for t in done if t.exception() is None), elapsed


def through_kafka(jobs: list[InferenceJob], concurrency: int) -> tuple[int, float, int]:
    env = {
        "KLLM_MAX_IN_FLIGHT": str(concurrency),
        "KLLM_MODELS": f'[{{"name": "smollm2-135m", "slots": {concurrency}}}]',
    }
    with running(("inference",), env) as bootstrap:
        reader = TailReader(bootstrap, GENERATIONS.name, {"fetch.wait.max.ms": 10})
        producer = make_producer(bootstrap)
        warm = make_jobs(1, jobs[0].request.max_tokens or 32)[0]
        producer.produce(INFERENCE.name, key=warm.request.request_id, value=encode(warm))
        producer.flush(10)
        reader.wait_for({warm.request.request_id}, min(60, current().left()), lambda _k, _v: None)
        wanted = {j.request.request_id for j in jobs}
        got: dict[str, Generation] = {}
        t0 = time.perf_counter()
        for j in jobs:
            producer.produce(INFERENCE.name, key=j.request.request_id, value=encode(j))
        producer.flush(10)
        budget = min(600, current().left())
        reader.wait_for(wanted, budget, lambda k, v: got.__setitem__(k, decode(v, Generation)))
        elapsed = time.perf_counter() - t0
        reader.close()
    tokens = sum(g.usage.completion_tokens for g in got.values())
    return tokens, elapsed, len(jobs) - len(got)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=48, help="requests per measurement (default 48)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, N (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda _deadline: _main(args), args.limit_s)


def _main(args: argparse.Namespace) -> int:
    jobs = make_jobs(args.jobs, args.max_tokens)
    print(f"{args.jobs} jobs, {args.max_tokens} max tokens, N = {args.concurrency}", flush=True)
    d_tokens, d_s = asyncio.run(engine_direct(jobs, args.concurrency))
    print(
        f"engine-direct:  {d_tokens} tokens in {d_s:.1f}s = {d_tokens / d_s:.1f} tok/s", flush=True
    )
    k_tokens, k_s, lost = through_kafka(jobs, args.concurrency)
    print(
        f"through Kafka:  {k_tokens} tokens in {k_s:.1f}s = {k_tokens / k_s:.1f} tok/s"
        f"  ({lost} lost)",
        flush=True,
    )
    ratio = (k_tokens / k_s) / (d_tokens / d_s)
    print(f"ratio worker / engine: {ratio:.3f} (target >= 0.9)")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
