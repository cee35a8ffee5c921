"""Versioned per-tenant output moderation policies (policies/moderation/v<N>.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kllm.core.errors import ConfigError
from processors.policies import Policy, PolicyBook, load_policies

REPO = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_newest_version_wins(tmp_path: Path) -> None:
    write(tmp_path, "v1.toml", "[default]\nmax_chars = 100\n")
    write(tmp_path, "v2.toml", "[default]\nmax_chars = 200\n")
    write(tmp_path, "v0.toml", "not = [valid")  # not a version name: ignored
    write(tmp_path, "notes.txt", "ignored")
    book = load_policies(tmp_path)
    assert book.version == 2
    assert book.default.version == 2
    assert book.default.max_chars == 200


def test_versions_compare_as_numbers(tmp_path: Path) -> None:
    write(tmp_path, "v9.toml", "[default]\nmax_chars = 9\n")
    write(tmp_path, "v10.toml", "[default]\nmax_chars = 10\n")
    book = load_policies(tmp_path)
    assert (book.version, book.default.max_chars) == (10, 10)


@pytest.mark.parametrize("sub", ["missing", "empty"])
def test_no_policy_file_is_a_clear_error(tmp_path: Path, sub: str) -> None:
    folder = tmp_path / sub
    if sub == "empty":
        folder.mkdir()
        write(folder, "notes.txt", "not a policy")
    expected = "does not exist" if sub == "missing" else "no moderation policy"
    with pytest.raises(ConfigError, match=expected):
        load_policies(folder)


def test_tenant_overrides_default_key_by_key(tmp_path: Path) -> None:
    write(
        tmp_path,
        "v3.toml",
        """
[default]
max_chars = 100
block_patterns = ['secret']
redact_patterns = ['ticket']

[default.deny_topics]
weapons = ["Build A Bomb"]

[tenants.x]
max_chars = 50

[tenants.y.deny_topics]
rivals = ["Globex"]
""",
    )
    book = load_policies(tmp_path)
    x, y, default = book.for_tenant("x"), book.for_tenant("y"), book.for_tenant("z")
    assert default is book.default
    assert (x.scope, y.scope, default.scope) == ("x", "y", "default")
    assert (x.max_chars, y.max_chars, default.max_chars) == (50, 100, 100)
    assert [p.pattern for p in x.block_patterns] == ["secret"]
    assert [p.pattern for p in x.redact_patterns] == ["ticket"]
    assert dict(x.deny_topics) == {"weapons": ("build a bomb",)}  # phrases lowercased
    assert dict(y.deny_topics) == {"rivals": ("globex",)}  # a whole key is replaced
    assert [p.pattern for p in y.block_patterns] == ["secret"]


def test_tag_format() -> None:
    assert Policy(4, "acme").tag == "moderation@v4/acme"
    assert Policy(1, "default").tag == "moderation@v1/default"
    book = PolicyBook(4, Policy(4, "default"), {"acme": Policy(4, "acme")})
    assert book.for_tenant("acme").tag == "moderation@v4/acme"
    assert book.for_tenant("other").tag == "moderation@v4/default"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[default\nmax_chars = 1", id="invalid-toml"),
        pytest.param("[default]\nmax_chars = 1\nmax_chars = 2\n", id="duplicate-key"),
        pytest.param("[default]\nmax_char = 10\n", id="unknown-default-key"),
        pytest.param("[tenants.x]\nblock_pattern = ['a']\n", id="unknown-tenant-key"),
        pytest.param("[default]\nmax_chars = 0\n", id="max-chars-zero"),
        pytest.param("[default]\nmax_chars = -5\n", id="max-chars-negative"),
        pytest.param("[default]\nmax_chars = 'x'\n", id="max-chars-string"),
        pytest.param("[default]\nmax_chars = 1.5\n", id="max-chars-float"),
        pytest.param("[tenants.x]\nmax_chars = 0\n", id="tenant-max-chars-zero"),
        pytest.param("[default]\nblock_patterns = ['(unclosed']\n", id="bad-block-regex"),
        pytest.param("[tenants.x]\nredact_patterns = ['[a-']\n", id="bad-redact-regex"),
        pytest.param("default = 3\n", id="default-not-a-table"),
        pytest.param("tenants = 'x'\n", id="tenants-not-a-table"),
        pytest.param("[default]\ndeny_topics = ['a']\n", id="deny-topics-not-a-table"),
    ],
)
def test_invalid_policy_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "v1.toml", text)
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[tenant.x]\nmax_chars = 5\n", id="tenant-singular"),
        pytest.param("[defaults]\nmax_chars = 5\n", id="defaults-plural"),
    ],
)
def test_unknown_top_level_table_is_a_config_error(tmp_path: Path, text: str) -> None:
    write(tmp_path, "v1.toml", text)
    with pytest.raises(ConfigError):
        load_policies(tmp_path)


def test_boolean_max_chars_is_a_config_error(tmp_path: Path) -> None:
    write(tmp_path, "v1.toml", "[default]\nmax_chars = true\n")
    with pytest.raises(ConfigError):
        load_policies(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[default.deny_topics]\nweapons = 'bomb'\n", id="deny-topic-phrases"),
        pytest.param("[default]\nblock_patterns = 'secret'\n", id="block-patterns"),
        pytest.param("[default]\nredact_patterns = 'ticket'\n", id="redact-patterns"),
    ],
)
def test_string_instead_of_list_is_a_config_error(tmp_path: Path, text: str) -> None:
    write(tmp_path, "v1.toml", text)
    with pytest.raises(ConfigError):
        load_policies(tmp_path)


def test_repository_policy_loads() -> None:
    book = load_policies(REPO / "policies" / "moderation")
    assert book.version >= 1
    assert "acme" in book.tenants
    acme = book.for_tenant("acme")
    assert acme.scope == "acme"
    assert acme.tag == f"moderation@v{book.version}/acme"
    assert acme.max_chars is not None
    assert book.default.max_chars is not None
    assert "competitors" in acme.deny_topics
    assert "weapons" in book.default.deny_topics
    assert any(p.search("AKIAABCDEFGHIJKLMNOP") for p in book.default.block_patterns)
    assert any(p.search("ACME-123456") for p in acme.redact_patterns)
    # Phrases are stored lower-case so the case-insensitive match works.
    for policy in (book.default, acme):
        for phrases in policy.deny_topics.values():
            assert all(p == p.lower() for p in phrases)
