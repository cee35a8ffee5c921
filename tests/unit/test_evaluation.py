"""Golden-set evaluation: the groundedness scorer, case scores, aggregates, comparison."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from processors.evaluation import (
    METRICS,
    CaseFileError,
    CaseScore,
    CaseScorer,
    GoldenCase,
    Observed,
    aggregate,
    compare,
    load_cases,
)
from processors.grounding import GroundingScorer, cited, declines, sentences

PASSAGE = (
    "The retrieval stage embeds each question with all-MiniLM-L6-v2 and searches Qdrant "
    "Edge. It returns the best five chunks by default, set by KLLM_TOP_K."
)


class WordsEmbedder:
    """Bag-of-words vectors over 512 hashed dimensions: cosine follows shared words."""

    dim = 512

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            v = [0.0] * self.dim
            for word in text.lower().replace(".", " ").split():
                v[zlib.crc32(word.encode()) % self.dim] += 1.0
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / norm for x in v])
        return out

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def scorer(min_overlap: float = 0.7, min_cosine: float = 0.75) -> GroundingScorer:
    return GroundingScorer(WordsEmbedder(), min_overlap=min_overlap, min_cosine=min_cosine)


# --- sentences, citations, declines ----------------------------------------------------


def test_sentences_split_at_ends_but_not_inside_names() -> None:
    text = (
        "See faq.md for details, e.g. the topics. It has 4 partitions [1]. Done!\n\n- a list item"
    )
    assert sentences(text) == [
        "See faq.md for details, e.g. the topics.",
        "It has 4 partitions [1].",
        "Done!",
        "a list item",
    ]


def test_a_citation_after_the_full_stop_stays_with_its_sentence() -> None:
    assert sentences("It has 4 partitions. [1] The broker is Tansu [2].") == [
        "It has 4 partitions [1].",
        "The broker is Tansu [2].",
    ]


def test_quoted_sentences_each_keep_their_citation() -> None:
    # The grounded answer's form: one quoted passage sentence per line, then its passage.
    quoted = '"It has 4 partitions." [1]\n"The broker is Tansu." [2]'
    assert sentences(quoted) == ['"It has 4 partitions [1]."', '"The broker is Tansu [2]."']
    assert [cited(s) for s in sentences(quoted)] == [[1], [2]]


def test_citations_are_read_in_order_and_in_groups() -> None:
    assert cited("Yes [2], and also [1, 3].") == [2, 1, 3]
    assert cited("No citation here.") == []


@pytest.mark.parametrize(
    ("answer", "declined"),
    [
        ("The context does not contain the answer.", True),
        ("I don't know. The passages are about Kafka.", True),
        ("That is not mentioned in the context.", True),
        ("There is no information about pricing.", True),
        ("The stage does contain a cache [1].", False),
        ("It uses Qdrant Edge. The context does not say more.", False),  # answers first
        ("The gateway does not provide TLS.", False),  # a claim, not a refusal
        ("When retrieval cannot find a passage, it answers anyway.", False),
        ("The passages do not mention pricing.", True),
    ],
)
def test_declines_reads_the_first_sentence(answer: str, declined: bool) -> None:
    assert declines(answer) is declined


# --- support ----------------------------------------------------------------------------


def test_a_paraphrase_of_the_passage_is_supported_by_overlap() -> None:
    s = scorer().support("Retrieval searches Qdrant Edge for the best five chunks [1].", [PASSAGE])
    (one,) = s.sentences
    assert one.supported and one.overlap >= 0.7 and one.passage == 1 and one.unknown == ()
    assert s.groundedness == 1.0


def test_an_invented_name_or_number_is_unsupported_whatever_the_overlap() -> None:
    invented = (
        "The retrieval stage embeds each question with bge-base-v1.5 and searches Qdrant Edge."
    )
    number = "It returns the best 12 chunks by default, set by KLLM_TOP_K."
    s = scorer().support(f"{invented} {number}", [PASSAGE])
    assert [x.supported for x in s.sentences] == [False, False]
    assert s.sentences[0].unknown == ("bge-base-v1.5",) and s.sentences[1].unknown == ("12",)
    assert s.groundedness == 0.0


def test_low_overlap_falls_back_to_similarity_with_a_passage_sentence() -> None:
    claim = "Edge Qdrant question searches stage the embeds."  # words shuffled, same bag
    strict = scorer(min_overlap=1.01, min_cosine=0.99).support(claim, [PASSAGE])
    loose = scorer(min_overlap=1.01, min_cosine=0.3).support(claim, [PASSAGE])
    assert not strict.sentences[0].supported and loose.sentences[0].supported
    assert loose.sentences[0].cosine > 0.3


def test_declining_sentences_make_no_claim_and_no_passages_support_nothing() -> None:
    assert scorer().support("The context does not say.", [PASSAGE]).groundedness is None
    (one,) = scorer().support("Retrieval uses Qdrant Edge.", []).sentences
    assert not one.supported and one.passage is None


# --- cases ------------------------------------------------------------------------------


def _case_line(**over: object) -> str:
    case = {
        "id": "ans-001",
        "kind": "answerable",
        "messages": [{"role": "user", "content": "How many chunks does retrieval return?"}],
        "reference": "Five chunks by default, set by KLLM_TOP_K.",
        "doc_ids": ["architecture"],
    } | over
    return orjson.dumps(case).decode()


def test_a_golden_file_with_bad_lines_names_each_of_them() -> None:
    lines = [
        _case_line(),
        "not json",
        _case_line(id="un-1", kind="unanswerable"),  # has doc_ids
        _case_line(id="ans-001"),  # twice
        _case_line(id="x", messages=[{"role": "assistant", "content": "hi"}]),
    ]
    with pytest.raises(CaseFileError) as err:
        load_cases(lines)
    text = str(err.value)
    assert all(f"line {n}:" in text for n in (2, 3, 4, 5)) and "line 1:" not in text
    assert "used twice" in text and "last message" in text


def _observed(answer: str, **over: object) -> Observed:
    fields: dict[str, object] = {
        "answer": answer,
        "retrieved": ["faq", "architecture"],
        "passages": ["Unrelated passage about feedback.", PASSAGE],
        "latency_ms": 900.0,
        "completion_tokens": 12,
    } | over
    return Observed(**fields)  # type: ignore[arg-type]


def test_a_good_answer_scores_well_on_every_count() -> None:
    case = GoldenCase.model_validate_json(_case_line())
    s = CaseScorer(WordsEmbedder(), scorer()).score(
        case, _observed("It returns the best five chunks by default, set by KLLM_TOP_K [2].")
    )
    assert (s.answered, s.declined, s.context_rank) == (True, False, 2)
    assert s.groundedness == 1.0 and s.citation_validity == 1.0 and s.unsupported == []
    assert s.fact_recall is not None and s.fact_recall >= 0.8
    assert s.rouge_l is not None and s.rouge_l > 0.5
    assert s.answer_cosine is not None and s.answer_cosine > 0.5


def test_a_wrong_citation_and_an_invented_claim_are_counted() -> None:
    case = GoldenCase.model_validate_json(_case_line())
    answer = "It returns five chunks by default [1]. It caches them in Redis [2]."
    s = CaseScorer(WordsEmbedder(), scorer()).score(case, _observed(answer))
    assert s.citation_validity == 0.0  # [1] is the unrelated passage; [2] lacks Redis
    assert s.groundedness == 0.5 and s.unsupported == ["It caches them in Redis [2]."]


def test_no_passages_support_nothing_and_unknown_passages_are_not_scored() -> None:
    case = GoldenCase.model_validate_json(_case_line())
    score = CaseScorer(WordsEmbedder(), scorer()).score
    answer = "It returns the best five chunks by default, set by KLLM_TOP_K."
    none = score(case, _observed(answer, retrieved=[], passages=[]))
    assert none.groundedness == 0.0 and none.context_rank is None
    cached = score(case, _observed(answer, passages=None, cached=True))
    assert cached.groundedness is None and cached.citation_validity is None


def test_an_unanswerable_case_declined_is_right_and_an_error_is_no_answer() -> None:
    case = GoldenCase.model_validate_json(
        _case_line(id="un-1", kind="unanswerable", doc_ids=[], reference="not in the context")
    )
    s = CaseScorer(WordsEmbedder(), scorer()).score(
        case, _observed("The context does not contain the answer.")
    )
    assert s.declined and s.context_rank is None and s.groundedness is None
    failed = CaseScorer(WordsEmbedder(), scorer()).score(case, _observed("", error="timeout"))
    assert not failed.answered and not failed.declined


# --- aggregates and comparison ----------------------------------------------------------


def _score(i: int, *, rank: int | None = 1, grounded: float = 1.0, declined: bool = False,
           answerable: bool = True, answered: bool = True) -> CaseScore:  # fmt: skip
    return CaseScore(
        id=f"c{i}", kind="answerable" if answerable else "unanswerable",
        answerable=answerable, answered=answered, declined=declined,
        context_rank=rank if answerable else None,
        groundedness=grounded if answerable and not declined else None,
        citation_validity=None, answer_cosine=0.8, rouge_l=0.5, fact_recall=0.6,
        latency_ms=100.0 * i, prompt_tokens=10, completion_tokens=5, cost_usd=0.0,
    )  # fmt: skip


def test_aggregates_apply_each_metric_to_its_own_cases() -> None:
    scores = [
        _score(1, rank=1),
        _score(2, rank=2, grounded=0.25),
        _score(3, rank=None, declined=True),
        _score(4, answerable=False, declined=True),
        _score(5, answerable=False, declined=False),
        _score(6, answered=False),
    ]
    agg = aggregate(scores)
    # Retrieval metrics over the answerable cases answered (an error is error_rate's).
    assert agg["context_recall"] == pytest.approx(2 / 3)
    assert agg["mrr"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert agg["groundedness"] == pytest.approx((1.0 + 0.25) / 2)
    assert agg["unsupported_rate"] == pytest.approx(0.5)
    assert agg["refusal_accuracy"] == pytest.approx(0.5)
    assert agg["false_refusal_rate"] == pytest.approx(1 / 3)
    assert agg["error_rate"] == pytest.approx(1 / 6)
    assert agg["latency_ms"] == pytest.approx(300.0)  # median of the answered
    assert agg["citation_validity"] is None


def test_compare_finds_a_regression_with_an_interval_that_excludes_zero() -> None:
    before = [_score(i, rank=1) for i in range(40)]
    after = [_score(i, rank=None if i % 2 else 1) for i in range(40)]  # half lose the doc
    deltas = {d.metric.name: d for d in compare(before, after, resamples=500)}
    recall = deltas["context_recall"]
    assert recall.delta == pytest.approx(-0.5) and recall.cases == 40
    assert recall.high is not None and recall.high < 0 and recall.worse_by() == pytest.approx(0.5)
    same = {d.metric.name: d for d in compare(before, before)}
    assert all(d.worse_by() == 0 for d in same.values())
    assert same["context_recall"].low == same["context_recall"].high == 0.0


def test_every_metric_says_what_it_measures() -> None:
    assert len({m.name for m in METRICS}) == len(METRICS)
    assert all(m.what for m in METRICS)


# --- the runner's pieces and the CLI ----------------------------------------------------


def test_a_case_becomes_a_greedy_tagged_request_and_its_answer_an_observation() -> None:
    from kllm.ops.evaluation import Answer, request_for
    from schemas import Chunk, Citation, Generation, Response

    case = GoldenCase.model_validate_json(_case_line(tenant=None))
    req = request_for(case, "r1", "eval", 64, None)
    assert (req.request_id, req.tenant, req.max_tokens) == ("eval-r1-ans-001", "eval", 64)
    assert req.sampling.temperature == 0.0 and req.metadata["eval_case"] == "ans-001"
    assert [t.content for t in req.messages] == [m.content for m in case.messages]
    chunk = Chunk(chunk_id="c1", doc_id="architecture.md", text=PASSAGE, score=0.9)
    resp = Response(
        request_id=req.request_id, tenant="eval", text="Five [1].", verdict="allowed",
        model="m", finish_reason="stop", pipeline_ms=1234.0,
        citations=[Citation(chunk_id="c1", doc_id="architecture.md", score=0.9)],
    )  # fmt: skip
    gen = Generation(request=req, chunks=[chunk], text="Five [1].", model="m", finish_reason="stop")
    seen = Answer(resp, gen).observed(30)
    assert (seen.retrieved, seen.passages, seen.latency_ms) == (
        ["architecture.md"],
        [PASSAGE],
        1234.0,
    )
    missing = Answer(None, None).observed(30)
    assert missing.error == "no answer within 30 s"


def test_compare_on_the_command_line_exits_1_on_a_regression(
    tmp_path: pytest.TempPathFactory,
) -> None:
    from pathlib import Path

    from kllm.cli.commands import main

    root = Path(str(tmp_path))
    for name, lose in (("a", False), ("b", True)):
        run = root / name
        run.mkdir()
        rows = [_score(i, rank=None if lose and i % 2 else 1) for i in range(20)]
        (run / "cases.jsonl").write_bytes(b"".join(orjson.dumps(s.to_json()) + b"\n" for s in rows))
    assert main(["eval", "compare", str(root / "a"), str(root / "b")]) == 1
    assert main(["eval", "compare", str(root / "a"), str(root / "a")]) == 0
    loose = ["--metric", "context_recall=0.6", "--metric", "mrr=0.6"]
    assert main(["eval", "compare", str(root / "a"), str(root / "b"), *loose]) == 0
    assert main(["eval", "compare", str(root / "a"), str(root / "missing")]) == 2
    assert main(["eval", "compare", str(root / "a"), str(root / "b"), "--metric", "nope=1"]) == 2
    nan = ["--metric", "mrr=nan"]
    assert main(["eval", "compare", str(root / "a"), str(root / "b"), *nan]) == 2
    (root / "c").mkdir()
    other = [_score(i + 100) for i in range(5)]  # no id in common with a
    (root / "c" / "cases.jsonl").write_bytes(
        b"".join(orjson.dumps(x.to_json()) + b"\n" for x in other)
    )
    assert main(["eval", "compare", str(root / "a"), str(root / "c")]) == 2


def test_the_summary_plot_is_a_png_of_the_gated_metrics(tmp_path: Path) -> None:
    from kllm.ops.evaluation import plot

    plot(tmp_path / "s.png", aggregate([_score(i) for i in range(5)]), "a run")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the shipped golden set -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_the_golden_set_is_valid_big_enough_and_true_to_the_docs() -> None:
    from processors.grounding import content_words

    cases = load_cases((REPO / "eval" / "golden.jsonl").read_text().splitlines())
    kinds = [c.kind for c in cases]
    assert len(cases) >= 120 and kinds.count("unanswerable") >= 20
    assert kinds.count("multi-turn") >= 20 and all(
        len(c.messages) >= 3 for c in cases if c.kind == "multi-turn"
    )
    # Ids as the seed corpus names its documents: the path under docs/, without suffix.
    docs = {p.stem: p.read_text() for p in (REPO / "docs").glob("*.md")}
    untrue = []
    for case in cases:
        assert set(case.doc_ids) <= docs.keys(), case.id
        if case.answerable:  # some distinctive word of the reference is in a cited doc
            text = " ".join(docs[d] for d in case.doc_ids).lower()
            words = [w for w in content_words(case.reference) if len(w) > 4]
            if words and not any(w in text for w in words):
                untrue.append(case.id)
    assert not untrue, f"references not found in their documents: {untrue}"


def test_the_labelled_sentences_quote_the_docs() -> None:
    docs = " ".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    rows = [
        orjson.loads(x) for x in (REPO / "eval" / "support_labels.jsonl").read_bytes().splitlines()
    ]
    assert len(rows) >= 80 and 0.3 < sum(r["supported"] for r in rows) / len(rows) < 0.7
    assert [r["id"] for r in rows if r["passage"] not in docs] == []
