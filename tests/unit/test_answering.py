"""The grounded answer policy: decline, keep the generated answer, or quote the passages."""

from __future__ import annotations

import pytest

from processors.answering import DECLINED_TEXT, GroundedAnswerer
from processors.grounding import declines
from processors.moderation import Moderator, OutputModerator
from processors.policies import Policy, PolicyBook
from schemas import ChatTurn, Chunk, Generation, Request, Response
from tests.unit.conftest import FakeClassifier

PASSAGES = [
    "The gateway listens on port 8000 by default. It speaks the OpenAI API.",
    "Each stage is a separate Python process started with python -m services.<stage>. "
    "Stages talk only through Kafka topics.",
]
SCORES = [0.61, 0.48]
QUESTION = "How is each stage started as its own process?"


def test_declined_text_reads_as_a_decline() -> None:
    assert declines(DECLINED_TEXT)


@pytest.mark.parametrize(
    ("question", "passages", "scores", "why"),
    [
        (QUESTION, [], [], "no passage"),
        (QUESTION, PASSAGES, [0.2, 0.1], "best passage scores under"),
        ("Which port does the Redis cache use?", PASSAGES, SCORES, "name(s) or number(s)"),
        ("How much does a commercial license cost monthly?", PASSAGES, SCORES, "words"),
    ],
)
def test_questions_the_passages_do_not_answer_are_declined(
    question: str, passages: list[str], scores: list[float], why: str
) -> None:
    answerer = GroundedAnswerer()
    assert why in answerer.unanswered(question, passages, scores)
    got = answerer.answer(question, question, "It costs 40 dollars.", passages, scores)
    assert got.mode == "declined"
    assert got.text == DECLINED_TEXT


def test_a_supported_generated_answer_stands() -> None:
    answer = "Each stage is a separate Python process started with python -m services.<stage>."
    got = GroundedAnswerer().answer(QUESTION, QUESTION, answer, PASSAGES, SCORES)
    assert got.mode == "generated"
    assert got.text == answer
    assert got.groundedness == 1.0


def test_an_unsupported_answer_is_replaced_by_cited_quotes_in_passage_order() -> None:
    invented = "You run karl-python with the Klombra tool. It builds output.yaml."
    got = GroundedAnswerer(quote_sentences=2).answer(QUESTION, QUESTION, invented, PASSAGES, SCORES)
    assert got.mode == "quoted"
    assert got.groundedness == 0.0
    lines = got.text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith('"Each stage is a separate Python process') and lines[0].endswith(
        "[2]"
    )
    assert all(line.endswith(("[1]", "[2]")) for line in lines)


def test_quotes_prefer_the_sentence_sharing_most_words_with_the_question() -> None:
    answerer = GroundedAnswerer(quote_sentences=1)
    quoted = answerer.quotes("Which port does the gateway use?", PASSAGES)
    assert quoted == [("The gateway listens on port 8000 by default.", 1)]


def test_without_replace_the_generated_answer_is_only_scored() -> None:
    invented = "You run karl-python with the Klombra tool."
    got = GroundedAnswerer().answer(QUESTION, QUESTION, invented, PASSAGES, SCORES, replace=False)
    assert (got.text, got.mode, got.groundedness) == (invented, "generated", 0.0)


def test_quote_sentences_must_be_positive() -> None:
    with pytest.raises(ValueError, match="quote_sentences"):
        GroundedAnswerer(quote_sentences=0)


def _generation(text: str, *, stream: bool = False, error: str | None = None) -> Generation:
    request = Request(request_id="r-1", tenant="acme", prompt=QUESTION, stream=stream)
    chunks = [
        Chunk(chunk_id=f"c{i}", doc_id=f"d{i}", text=t, score=s)
        for i, (t, s) in enumerate(zip(PASSAGES, SCORES, strict=True))
    ]
    return Generation(
        request=request, chunks=chunks, text=text, model="m", finish_reason="stop", error=error
    )


def _moderate(gen: Generation, policy: str) -> Response:
    checks = OutputModerator(FakeClassifier(), None, PolicyBook(1, Policy(1, "default"), {}))
    out = Moderator(checks, answer_policy=policy).process(gen)  # type: ignore[arg-type]
    response = out[0].message
    assert isinstance(response, Response)
    return response


def test_moderation_quotes_in_place_of_an_unsupported_answer_and_says_so() -> None:
    response = _moderate(_generation("Klombra builds it with karl-python."), "grounded")
    assert response.answer_mode == "quoted"
    assert response.groundedness == 0.0
    assert "separate Python process" in response.text
    assert [c.chunk_id for c in response.citations] == ["c0", "c1"]


@pytest.mark.parametrize(
    ("policy", "gen"),
    [
        ("flag", _generation("Klombra builds it.")),
        ("grounded", _generation("Klombra builds it.", stream=True)),  # the caller has it
    ],
)
def test_flagged_or_streamed_answers_are_scored_not_replaced(policy: str, gen: Generation) -> None:
    response = _moderate(gen, policy)
    assert (response.text, response.answer_mode, response.groundedness) == (
        gen.text,
        "generated",
        0.0,
    )


@pytest.mark.parametrize(
    "gen",
    [_generation("Klombra builds it.", error="engine down"), _generation("Klombra builds it.")],
)
def test_failed_answers_and_the_off_policy_are_left_alone(gen: Generation) -> None:
    response = _moderate(gen, "off" if gen.error is None else "grounded")
    assert (response.answer_mode, response.groundedness) == ("generated", None)


def test_a_conversation_is_grounded_on_its_latest_question() -> None:
    gen = _generation("Klombra builds it.").model_copy(
        update={
            "request": Request(
                request_id="r-2",
                messages=[
                    ChatTurn(role="user", content="What does the gateway speak?"),
                    ChatTurn(role="assistant", content="The OpenAI API."),
                    ChatTurn(role="user", content="What is the capital of Australia?"),
                ],
            )
        }
    )
    assert _moderate(gen, "grounded").answer_mode == "declined"


def test_a_capitalised_word_opening_a_later_sentence_is_no_name() -> None:
    question = "Thanks. Explain how each stage is started as its own process?"
    assert GroundedAnswerer().unanswered(question, PASSAGES, SCORES) == ""


def test_answers_from_tools_are_not_grounded_on_the_passages() -> None:
    from schemas.chat import FunctionSpec, Tool

    gen = _generation("It is 18 degrees in Paris.")
    with_tools = gen.request.model_copy(
        update={"tools": [Tool(function=FunctionSpec(name="weather"))]}
    )
    after_tool = gen.request.model_copy(
        update={
            "messages": [
                ChatTurn(role="user", content="How warm is Paris?"),
                ChatTurn(role="tool", content="18 C"),
                ChatTurn(role="user", content="So how warm is it?"),
            ]
        }
    )
    for request in (with_tools, after_tool):
        response = _moderate(gen.model_copy(update={"request": request}), "grounded")
        assert (response.text, response.answer_mode) == (gen.text, "generated")


def test_headings_joined_to_a_sentence_are_not_quoted() -> None:
    passages = ["## Which model runs on CPU? On CPU, kllm runs SmolLM2. ## Only a heading"]
    quoted = GroundedAnswerer().quotes("Which model runs on CPU?", passages)
    assert quoted == [("On CPU, kllm runs SmolLM2.", 1)]
