"""Embedding requests answered with the pipeline's own embedding model: the one the
retrieval stage searches with, so a caller's vectors are comparable to the corpus's.

Requests in a batch share one embedding call; when it fails, the batch is split
(processors.batching.isolate) so each failing request fails on its own, and a
model that looks down leaves the rest to be read again.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence

import numpy as np

from processors.base import Emit, Rejected
from processors.batching import Failed, Result, isolate, tried
from processors.retrieval import Embedder
from schemas import EmbeddingRequest, Embeddings
from topics import EMBEDDINGS


def packed(vector: Sequence[float]) -> str:
    """A vector as base64 of its little-endian float32 values."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def unpacked(text: str) -> list[float]:
    values: list[float] = np.frombuffer(base64.b64decode(text), dtype="<f4").tolist()
    return values


class EmbeddingAnswerer:
    def __init__(self, embedder: Embedder, model: str, max_inputs: int = 256) -> None:
        self.embedder = embedder
        self.model = model
        """The name callers ask for the embedder by."""
        self.max_inputs = max_inputs
        """Inputs embedded per call, over the batch's requests: a large batch is taken a
        part at a time, so the stage's other consumers get their turn."""

    def process_each(self, requests: Sequence[EmbeddingRequest]) -> list[Result]:
        """One result per request, in order (fewer when the model is down)."""
        results: list[Result | None] = [None] * len(requests)
        asked: list[int] = []
        inputs = 0
        for i, request in enumerate(requests):
            if request.model not in (None, self.model):
                why = f"model {request.model!r} is not served here (embeddings: {self.model!r})"
                results[i] = Failed(Rejected(why, code="model_not_found"))
                continue
            inputs += len(request.inputs)
            if asked and inputs > self.max_inputs:
                break  # this and the rest are read again, after the other consumers
            asked.append(i)
        answered: list[Result] = []
        if asked:  # none when every request named another model
            answered = isolate([requests[i] for i in asked], self._answer)
        for i, answer in zip(asked, answered, strict=False):
            results[i] = answer
        return tried(results)

    def _answer(self, part: Sequence[EmbeddingRequest]) -> list[list[Emit]]:
        t0 = time.perf_counter()
        vectors = self.embedder.embed([text for r in part for text in r.inputs])
        embed_ms = (time.perf_counter() - t0) * 1000
        out: list[list[Emit]] = []
        start = 0
        for request in part:
            end = start + len(request.inputs)
            answer = Embeddings(
                request_id=request.request_id,
                tenant=request.tenant,
                model=self.model,
                vectors_b64=[packed(v) for v in vectors[start:end]],
                prompt_tokens=sum(self.embedder.count_tokens(t) for t in request.inputs),
                embed_ms=embed_ms,
            )
            out.append([Emit(EMBEDDINGS, request.request_id, answer)])
            start = end
        return out
