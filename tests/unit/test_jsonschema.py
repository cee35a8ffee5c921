"""The published JSON Schemas match the models, and validate what the codec writes."""

from __future__ import annotations

import orjson
import pytest
from jsonschema import Draft202012Validator

from schemas import Request, encode
from schemas.chat import ChatTurn, ResponseFormat, Sampling
from schemas.jsonschema import FOLDER, rendered


def test_the_files_in_the_repository_are_up_to_date() -> None:
    on_disk = {p.name: p.read_bytes() for p in FOLDER.glob("*.json")}
    assert on_disk == rendered(), "run: python -m schemas.jsonschema"


def _validator(name: str) -> Draft202012Validator:
    schema = orjson.loads(rendered()[name])
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_a_v2_request_written_by_the_codec_validates() -> None:
    request = Request(
        request_id="r-1",
        messages=[
            ChatTurn(role="system", content="Be brief."),
            ChatTurn(role="user", content="What is Kafka?"),
        ],
        sampling=Sampling(temperature=0.5, stop=["\n"]),
        response_format=ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
        ),
    )
    _validator("llm.request.v2.json").validate(orjson.loads(encode(request)))


@pytest.mark.parametrize(
    "change",
    [
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"sampling": {"temperature": 5}},
        {"colour": "red"},
        {"v": 1},
    ],
)
def test_a_bad_request_does_not_validate(change: dict[str, object]) -> None:
    body = orjson.loads(encode(Request.from_prompt("q", request_id="r-1"))) | change
    assert list(_validator("llm.request.v2.json").iter_errors(body))
