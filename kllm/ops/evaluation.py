"""Runs a golden set through the live pipeline over Kafka, and writes what it measured.

Each case becomes a request on the request topic, at temperature 0 and at most
``concurrency`` in flight, tagged with the run id in its metadata. Its answer is read
from the response topic and the passages the model saw from the generation topic, both
tailed from before the first request is sent, so none slips by. A case with no answer
within ``timeout_s`` counts as an error. The scoring is processors.evaluation's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from kllm.core.errors import PipelineError
from kllm.runtime.kafka import TailReader, make_producer, produce_sync
from processors.evaluation import METRICS, CaseScore, CaseScorer, GoldenCase, Observed
from schemas import ChatTurn, Generation, Request, Response, Sampling, decode, encode
from schemas.codec import SchemaError
from topics import GENERATIONS, REQUESTS, RESPONSES

log = logging.getLogger(__name__)

M = TypeVar("M", Response, Generation)

GENERATION_GRACE_S = 5.0
"""After the last answer, how long to wait for generations not yet read."""


@dataclass(frozen=True)
class Answer:
    """What came back for one case: its response, and the generation behind it."""

    response: Response | None
    generation: Generation | None

    def observed(self, timeout_s: float) -> Observed:
        r, g = self.response, self.generation
        if r is None:
            return Observed("", [], None, error=f"no answer within {timeout_s:g} s")
        return Observed(
            answer=r.text,
            retrieved=[c.doc_id for c in r.citations],
            passages=[c.text for c in g.chunks] if g is not None else None,
            latency_ms=r.pipeline_ms,
            prompt_tokens=r.usage.prompt_tokens,
            completion_tokens=r.usage.completion_tokens,
            cost_usd=r.cost_usd,
            error=r.error,
            cached=r.cached,
            answer_mode=r.answer_mode,
        )


def request_id(run_id: str, case: GoldenCase) -> str:
    """The request id of a case in a run."""
    return f"eval-{run_id}-{case.id}"


def request_for(
    case: GoldenCase, run_id: str, tenant: str, max_tokens: int | None, model: str | None
) -> Request:
    """The pipeline request a case becomes (greedy, so runs compare)."""
    return Request(
        request_id=request_id(run_id, case),
        tenant=case.tenant or tenant,
        messages=[ChatTurn(role=t.role, content=t.content) for t in case.messages],
        max_tokens=max_tokens,
        model=model,
        sampling=Sampling(temperature=0.0),
        metadata={"eval_run": run_id, "eval_case": case.id},
    )


class PipelineAsker:
    """Sends requests and collects their answers (the Kafka edge of an evaluation)."""

    def __init__(
        self,
        bootstrap: str,
        consumer_config: Mapping[str, Any],
        producer_config: Mapping[str, Any],
    ) -> None:
        self.bootstrap = bootstrap
        self.consumer_config = dict(consumer_config)
        self.producer_config = dict(producer_config)

    def ask_all(
        self,
        requests: Sequence[Request],
        *,
        concurrency: int,
        timeout_s: float,
        on_answer: Callable[[], None] = lambda: None,
    ) -> dict[str, Answer]:
        """Every request's answer (None: none within ``timeout_s`` of its sending)."""
        responses = TailReader(self.bootstrap, RESPONSES.name, self.consumer_config)
        generations = TailReader(self.bootstrap, GENERATIONS.name, self.consumer_config)
        producer = make_producer(self.bootstrap, self.producer_config)
        waiting = list(reversed(requests))
        wanted = {r.request_id for r in requests}
        sent: dict[str, float] = {}
        got: dict[str, Response | None] = {}
        gens: dict[str, Generation] = {}
        try:
            while waiting or sent:
                while waiting and len(sent) < concurrency:
                    # Its clock starts now: the pipeline's latency, not the wait here.
                    req = waiting.pop().model_copy(update={"created_at": time.time()})
                    produce_sync(producer, REQUESTS.name, req.tenant, encode(req))
                    sent[req.request_id] = time.monotonic()
                _read(generations, 0.02, wanted, Generation, gens)
                for rid, resp in _read(responses, 0.2, set(sent), Response, {}).items():
                    got[rid] = resp
                    del sent[rid]
                    on_answer()
                for rid in [r for r, t in sent.items() if time.monotonic() - t > timeout_s]:
                    got[rid] = None
                    del sent[rid]
                    on_answer()
            missing = {r for r, resp in got.items() if resp and not resp.cached} - gens.keys()
            deadline = time.monotonic() + GENERATION_GRACE_S
            while missing and time.monotonic() < deadline:
                _read(generations, 0.2, missing, Generation, gens)
                missing -= gens.keys()
            if missing:  # their support is not scored: say so
                log.warning("generations not read", extra={"requests": len(missing)})
        finally:
            responses.close()
            generations.close()
        return {rid: Answer(got.get(rid), gens.get(rid)) for rid in wanted}


def _read(
    reader: TailReader, seconds: float, keys: set[str], schema: type[M], into: dict[str, M]
) -> dict[str, M]:
    """Records of ``keys`` read within ``seconds``, decoded, added to ``into``."""
    for key, value in reader.records(seconds):
        if key not in keys:
            continue
        try:
            into[key] = decode(value, schema)
        except SchemaError as exc:  # not ours to fix: say so, and keep waiting
            log.warning("unreadable record", extra={"request_id": key, "reason": str(exc)})
    return into


def score_all(
    cases: Sequence[GoldenCase],
    answers: Mapping[str, Answer],
    scorer: CaseScorer,
    run_id: str,
    timeout_s: float,
) -> list[tuple[CaseScore, Answer]]:
    out = []
    for case in cases:
        answer = answers[request_id(run_id, case)]
        out.append((scorer.score(case, answer.observed(timeout_s)), answer))
    return out


def write_cases(
    path: Path, scored: Sequence[tuple[CaseScore, Answer]], cases: Sequence[GoldenCase]
) -> None:
    """One JSON line per case: its scores, the question, the answer and the model."""
    by_id = {c.id: c for c in cases}
    with path.open("wb") as out:
        for score, answer in scored:
            row = score.to_json() | {
                "question": by_id[score.id].messages[-1].content,
                "reference": by_id[score.id].reference,
                "answer": answer.response.text if answer.response else None,
                "retrieved": [c.doc_id for c in answer.response.citations]
                if answer.response
                else [],
                "model": answer.response.model if answer.response else None,
                "template": answer.response.template if answer.response else None,
            }
            out.write(orjson.dumps(row) + b"\n")


def read_cases(path: Path) -> list[CaseScore]:
    """The per-case scores of a run: its folder, or its cases.jsonl."""
    file = path / "cases.jsonl" if path.is_dir() else path
    try:
        lines = file.read_bytes().splitlines()
    except OSError as exc:
        raise PipelineError(f"{file}: cannot read the run's cases ({exc.strerror})") from exc
    try:
        return [CaseScore.from_json(orjson.loads(line)) for line in lines if line.strip()]
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise PipelineError(f"{file}: not the cases.jsonl of an evaluation run ({exc})") from exc


def plot(path: Path, summary: Mapping[str, float | None], title: str) -> None:
    """The share metrics (0 to 1) as horizontal bars, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [m for m in METRICS if m.gate and summary.get(m.name) is not None]
    values = [float(summary[m.name] or 0.0) for m in shares]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shares) + 1.2))
    colors = ["tab:green" if m.higher_is_better else "tab:red" for m in shares]
    ax.barh([m.name for m in shares], values, color=colors)
    for y, v in enumerate(values):
        ax.text(min(v + 0.01, 0.93), y, f"{v:.2f}", va="center")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("share of cases (green: higher is better; red: lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
