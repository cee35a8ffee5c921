from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from pathlib import Path

import pytest

from kllm.core.errors import ConfigError
from processors.retrieval import SYSTEM_PROMPT
from processors.templates import (
    Assignment,
    TemplateCatalog,
    load_templates,
    parse_tag,
)

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
N_IDS = 1_000
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return load_templates(PROMPTS)


def _write(folder: Path, rel: str, text: str) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _variant(vid: str, weight: object = 1.0, system: str = "Answer.") -> str:
    return f'[variants.{vid}]\nweight = {weight}\nsystem = "{system}"\n'


def _shares(catalog: TemplateCatalog, name: str, ids: list[str]) -> dict[str, float]:
    counts = Counter(parse_tag(catalog.assign(name, rid).tag)[2] for rid in ids)
    return {vid: n / len(ids) for vid, n in counts.items()}


def _seeded_uuids(n: int) -> list[str]:
    rng = random.Random(1234)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


# --- the repository's prompts/ -------------------------------------------------------------


def test_repository_prompts_load(catalog: TemplateCatalog) -> None:
    latest = catalog.latest("rag")
    assert latest.version == 2
    assert [v.id for v in latest.variants] == ["a", "b"]
    assert [v.weight for v in latest.variants] == [0.8, 0.2]
    assert catalog.versions("rag") == (1, 2)
    assert latest.description


def test_rag_v1_is_the_current_system_prompt(catalog: TemplateCatalog) -> None:
    v1 = catalog.get("rag", 1)
    assert [(v.id, v.weight) for v in v1.variants] == [("a", 1.0)]
    assert v1.variants[0].system == SYSTEM_PROMPT


def test_rag_v2_b_is_a_different_prompt_that_still_cites(catalog: TemplateCatalog) -> None:
    a, b = catalog.get("rag", 2).variants
    assert a.system == SYSTEM_PROMPT
    assert b.system != a.system
    assert "numbered context" in b.system
    assert "[n]" in b.system


# --- assignment ----------------------------------------------------------------------------


def test_same_request_id_gets_the_same_tag(catalog: TemplateCatalog) -> None:
    other = load_templates(PROMPTS)
    for i in range(200):
        rid = f"req-{i}"
        first = catalog.assign("rag", rid)
        assert catalog.assign("rag", rid) == first
        assert other.assign("rag", rid) == first


def test_assignment_depends_on_the_request_id(catalog: TemplateCatalog) -> None:
    tags = {catalog.assign("rag", f"req-{i}").tag for i in range(100)}
    assert tags == {"rag@v2/a", "rag@v2/b"}


@pytest.mark.parametrize("ids", [[f"req-{i}" for i in range(N_IDS)], _seeded_uuids(N_IDS)])
def test_rag_v2_split_follows_the_weights(catalog: TemplateCatalog, ids: list[str]) -> None:
    shares = _shares(catalog, "rag", ids)
    assert set(shares) == {"a", "b"}
    assert abs(shares["a"] - 0.8) <= TOLERANCE
    assert abs(shares["b"] - 0.2) <= TOLERANCE


def test_fifty_fifty_split(tmp_path: Path) -> None:
    _write(tmp_path, "ab/v1.toml", _variant("x", 3) + _variant("y", 3))
    catalog = load_templates(tmp_path)
    for ids in ([f"req-{i}" for i in range(N_IDS)], _seeded_uuids(N_IDS)):
        shares = _shares(catalog, "ab", ids)
        assert abs(shares["x"] - 0.5) <= TOLERANCE
        assert abs(shares["y"] - 0.5) <= TOLERANCE


def test_split_ignores_the_order_of_tables_in_the_file(tmp_path: Path) -> None:
    _write(tmp_path, "one/one/v1.toml", _variant("a", 0.5) + _variant("b", 0.5))
    _write(tmp_path, "two/one/v1.toml", _variant("b", 0.5) + _variant("a", 0.5))
    one, two = load_templates(tmp_path / "one"), load_templates(tmp_path / "two")
    for i in range(100):
        assert one.assign("one", f"req-{i}") == two.assign("one", f"req-{i}")


def test_pinning_an_older_version(catalog: TemplateCatalog) -> None:
    assert catalog.assign("rag", "req-1", version=1) == Assignment("rag@v1/a", SYSTEM_PROMPT)


def test_single_variant_always_wins(tmp_path: Path) -> None:
    _write(tmp_path, "solo/v1.toml", _variant("only", 0.01, "Solo."))
    catalog = load_templates(tmp_path)
    assert {catalog.assign("solo", f"r{i}").tag for i in range(50)} == {"solo@v1/only"}


# --- render and tags -----------------------------------------------------------------------


def test_render_returns_the_variant_text(catalog: TemplateCatalog) -> None:
    a, b = catalog.get("rag", 2).variants
    assert catalog.render("rag@v2/a") == a.system
    assert catalog.render("rag@v2/b") == b.system
    assert catalog.render("rag@v1/a") == SYSTEM_PROMPT


def test_assign_then_render_round_trips(catalog: TemplateCatalog) -> None:
    for i in range(100):
        assignment = catalog.assign("rag", f"req-{i}")
        assert catalog.render(assignment.tag) == assignment.system


def test_parse_tag() -> None:
    assert parse_tag("rag@v2/b") == ("rag", 2, "b")
    assert parse_tag("my-tpl_1@v10/ctl") == ("my-tpl_1", 10, "ctl")


@pytest.mark.parametrize("tag", ["rag", "rag@2/b", "rag@v2", "rag@v/b", "@v2/b", "rag@v2/b/c"])
def test_malformed_tag_is_a_config_error(catalog: TemplateCatalog, tag: str) -> None:
    with pytest.raises(ConfigError, match="malformed template tag"):
        catalog.render(tag)


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("rag@v2/c", r"unknown variant .* has: a, b"),
        ("rag@v9/a", r"unknown version v9 of template 'rag'; known: v1, v2"),
        ("nope@v1/a", r"unknown template 'nope'; known: rag"),
    ],
)
def test_unknown_tag_is_a_config_error(catalog: TemplateCatalog, tag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        catalog.render(tag)


def test_unknown_name_or_version_lists_what_exists(catalog: TemplateCatalog) -> None:
    with pytest.raises(ConfigError, match="known: rag"):
        catalog.latest("summary")
    with pytest.raises(ConfigError, match="known: rag"):
        catalog.assign("summary", "req-1")
    with pytest.raises(ConfigError, match="known: v1, v2"):
        catalog.assign("rag", "req-1", version=3)


# --- loading errors ------------------------------------------------------------------------


def _load_error(folder: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_templates(folder)
    return str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "rag/v1.toml", "description = \n[variants.a\n")
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "invalid TOML" in message


@pytest.mark.parametrize(
    "body",
    ['description = "no variants"\n', "variants = {}\n", 'variants = "a"\n'],
    ids=["missing", "empty", "not-a-table"],
)
def test_missing_or_empty_variants(tmp_path: Path, body: str) -> None:
    path = _write(tmp_path, "rag/v1.toml", body)
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "at least one [variants.<id>]" in message


@pytest.mark.parametrize("weight", ["0", "-0.5", "0.0", "nan", "inf"])
def test_non_positive_weight(tmp_path: Path, weight: str) -> None:
    path = _write(tmp_path, "rag/v1.toml", _variant("a") + _variant("b", weight))
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "variant 'b'" in message
    assert "'weight' must be a finite number > 0" in message


@pytest.mark.parametrize("weight", ['"0.5"', "true"])
def test_non_numeric_weight(tmp_path: Path, weight: str) -> None:
    path = _write(tmp_path, "rag/v1.toml", _variant("a", weight))
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "'weight' must be a number" in message


def test_missing_weight(tmp_path: Path) -> None:
    path = _write(tmp_path, "rag/v1.toml", '[variants.a]\nsystem = "Answer."\n')
    assert str(path) in _load_error(tmp_path)


@pytest.mark.parametrize(
    "body",
    ["[variants.a]\nweight = 1.0\n", '[variants.a]\nweight = 1.0\nsystem = "  "\n'],
    ids=["missing", "blank"],
)
def test_missing_system_text(tmp_path: Path, body: str) -> None:
    path = _write(tmp_path, "rag/v1.toml", body)
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "'system' must be a non-empty string" in message


def test_misspelt_key_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "rag/v1.toml", '[variants.a]\nweight = 1.0\nsytem = "Answer."\n')
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "unknown keys ['sytem']" in message


@pytest.mark.parametrize(
    "rel",
    ["rag/1.toml", "rag/v0.toml", "rag/latest.toml", "rag/v1.5.toml", "Rag/v1.toml", "x.toml"],
)
def test_bad_file_names(tmp_path: Path, rel: str) -> None:
    path = _write(tmp_path, rel, _variant("a"))
    assert str(path) in _load_error(tmp_path)


def test_variant_id_that_would_break_tags(tmp_path: Path) -> None:
    path = _write(tmp_path, "rag/v1.toml", _variant('"a/b"'))
    message = _load_error(tmp_path)
    assert str(path) in message
    assert "id must match" in message


def test_duplicate_versions(tmp_path: Path) -> None:
    first = _write(tmp_path, "rag/v01.toml", _variant("a"))
    second = _write(tmp_path, "rag/v1.toml", _variant("a"))
    message = _load_error(tmp_path)
    assert "duplicate version v1" in message
    assert str(first) in message
    assert str(second) in message


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "absent")


def test_non_toml_files_are_ignored(tmp_path: Path) -> None:
    _write(tmp_path, "README.md", "# notes")
    _write(tmp_path, "rag/notes.txt", "draft")
    _write(tmp_path, "rag/v1.toml", 'description = "d"\n' + _variant("a"))
    catalog = load_templates(tmp_path)
    assert catalog.names() == ("rag",)
    assert catalog.latest("rag").description == "d"


def test_a_template_may_drop_the_callers_instructions(tmp_path: Path) -> None:
    _write(tmp_path, "a/v1.toml", 'client_instructions = "drop"\n' + _variant("x", 1))
    _write(tmp_path, "b/v1.toml", _variant("x", 1))
    catalog = load_templates(tmp_path)
    assert catalog.assign("a", "r").locks_instructions
    assert not catalog.assign("b", "r").locks_instructions


@pytest.mark.parametrize(
    ("head", "error"),
    [
        ('client_instructions = "ignore"\n', "must be"),
        ('client_instruction = "drop"\n', "unknown keys ['client_instruction']"),
    ],
)
def test_template_keys_are_checked(tmp_path: Path, head: str, error: str) -> None:
    _write(tmp_path, "a/v1.toml", head + _variant("x", 1))
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_templates(tmp_path)
