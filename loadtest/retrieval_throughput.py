"""Retrieval throughput versus raw embedding throughput, and search latency at scale.

1. raw: sentence-transformers all-MiniLM-L6-v2 embedding the questions at batch 64.
2. through Kafka: the embedded broker and the retrieval process; the same
   questions published to llm.retrieval at once, jobs read from llm.inference.
3. search latency of the vector store at --chunks chunks (random unit vectors,
   10 tenants), with the tenant filter the stage uses.

The ratio of (2) to (1) is what the stage costs around the model (target >= 0.8).

    python loadtest/retrieval_throughput.py --questions 1024 --chunks 100000

Time limit: the whole run, startup and teardown included, ends within --limit-s
(default 900 s). Jobs not back from the stage by the limit count as lost; loading the
chunks stops at the limit and the search is measured on what was loaded (INCOMPLETE).
Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from harness import add_limit_arg, current, run_limited, running

from kllm.adapters.retrieval.embedder import SentenceTransformerEmbedder
from kllm.adapters.retrieval.qdrant_edge import EdgeStore
from kllm.runtime.kafka import TailReader, make_producer
from processors.retrieval import StoredChunk
from schemas import Request, encode
from topics import INFERENCE, RETRIEVAL

TOPICS = ("offsets", "partitions", "moderation", "tenants", "deadlines", "retries", "the DLQ")

LIMIT_S = 900
"""The whole run (default settings) ends within this many seconds; --limit-s changes it."""


def questions(n: int) -> list[str]:
    return [
        f"Question {i}: how does the pipeline handle {TOPICS[i % len(TOPICS)]}?" for i in range(n)
    ]


def raw(texts: list[str]) -> float:
    embedder = SentenceTransformerEmbedder(batch_size=64)
    embedder.embed(texts[:64])  # warm-up
    t0 = time.perf_counter()
    embedder.embed(texts)
    return len(texts) / (time.perf_counter() - t0)


def through_kafka(texts: list[str]) -> tuple[float, int]:
    # Alone on the machine, the stage gets torch's default threads, as the raw run does.
    with running(("retrieval",), env={"KLLM_TORCH_THREADS": "0"}) as bootstrap:
        reader = TailReader(bootstrap, INFERENCE.name, {"fetch.wait.max.ms": 10})
        producer = make_producer(bootstrap)
        reqs = [Request(request_id=f"r-{uuid.uuid4()}", prompt=t) for t in texts]
        warm = Request(request_id="warm-up", prompt=texts[0])
        producer.produce(RETRIEVAL.name, key=warm.request_id, value=encode(warm))
        producer.flush(10)
        reader.wait_for({warm.request_id}, min(60, current().left()), lambda _k, _v: None)
        t0 = time.perf_counter()
        for r in reqs:
            producer.produce(RETRIEVAL.name, key=r.request_id, value=encode(r))
            producer.poll(0)
        producer.flush(10)
        budget = min(600, current().left() - 120)  # and some left for the search run
        missing = reader.wait_for({r.request_id for r in reqs}, budget, lambda _k, _v: None)
        rate = (len(reqs) - len(missing)) / (time.perf_counter() - t0)
        reader.close()
    return rate, len(missing)


def _percentiles(store: EdgeStore, rng: np.random.Generator, queries: int, dim: int) -> str:
    lat = []
    for _ in range(queries):
        q = rng.standard_normal(dim)
        q /= np.linalg.norm(q)
        t1 = time.perf_counter()
        store.search(q.tolist(), ["t3", "public"], 3, 0.0)
        lat.append((time.perf_counter() - t1) * 1000)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return f"p50 {lat[len(lat) // 2]:.2f} ms, p99 {p99:.2f} ms"


def search_latency(n_chunks: int, queries: int = 500, dim: int = 384) -> None:
    """Search latency in the embedded default (Qdrant Edge), as loaded and then with the
    HNSW index built by the optimizer."""
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore(Path(tmp), "bench")
        store.ensure_collection(dim)
        t0 = time.perf_counter()
        for start in range(0, n_chunks, 2000):
            if current().left() < 60:
                print(f"\nINCOMPLETE: time limit; {start} of {n_chunks} chunks loaded")
                n_chunks = start
                break
            n = min(2000, n_chunks - start)
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store.upsert(
                [
                    StoredChunk(
                        str(uuid.UUID(int=start + i)),
                        f"t{(start + i) % 10}",
                        f"d{(start + i) // 5}",
                        "x",
                        "",
                        vecs[i].tolist(),
                    )
                    for i in range(n)
                ]
            )
            print(f"\r  loading {start + n}/{n_chunks} chunks", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        load_s = time.perf_counter() - t0
        head = f"search at {n_chunks} chunks (embedded Qdrant, tenant filter, top 3)"
        print(f"{head}, as loaded in {load_s:.0f}s: {_percentiles(store, rng, queries, dim)}")
        t0 = time.perf_counter()
        store.optimize()
        build_s = time.perf_counter() - t0
        print(f"{head}, HNSW built in {build_s:.0f}s: {_percentiles(store, rng, queries, dim)}")
        store.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--questions", type=int, default=1024, help="questions per run (default 1024)")
    p.add_argument(
        "--chunks", type=int, default=100_000, help="chunks for the latency run; 0 skips"
    )
    add_limit_arg(p, LIMIT_S)
    args = p.parse_args()
    return run_limited(lambda _deadline: _main(args), args.limit_s)


def _main(args: argparse.Namespace) -> int:
    texts = questions(args.questions)
    raw_rate = raw(texts)
    print(f"raw embedding (batch 64):  {raw_rate:.0f} questions/s", flush=True)
    stage_rate, lost = through_kafka(texts)
    print(f"retrieval through Kafka:   {stage_rate:.0f} questions/s ({lost} lost)", flush=True)
    print(f"ratio stage / raw: {stage_rate / raw_rate:.3f} (target >= 0.8)", flush=True)
    if args.chunks:
        search_latency(args.chunks)
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
