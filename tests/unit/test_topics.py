from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import topics
from schemas import DeadLetter, Message, registry
from topics import ALL, READER_GROUPS, TopicSpec, by_name, groups, provision
from topics.catalog import _PRIMARY

REPO = Path(__file__).resolve().parents[2]
NAMES = [t.name for t in ALL]


def test_names_unique() -> None:
    assert len(NAMES) == len(set(NAMES))


def test_catalog_is_nonempty_and_exported() -> None:
    assert {"llm.requests", "llm.responses", "llm.requests.dlq"} <= set(NAMES)
    for export in topics.__all__:
        value = getattr(topics, export)
        if isinstance(value, TopicSpec):
            assert value in ALL, export


@pytest.mark.parametrize("spec", [t for t in ALL if t.has_dlq], ids=lambda t: t.name)
def test_every_dlq_twin_is_declared(spec: TopicSpec) -> None:
    twin = spec.dlq
    assert twin.name == f"{spec.name}.dlq"
    assert twin in ALL
    assert by_name(twin.name) == twin
    assert twin.schema is DeadLetter
    assert twin.partitions == 1
    assert twin.retention_ms == 30 * 24 * 3600 * 1000
    assert not twin.has_dlq


def test_no_dlq_without_a_source() -> None:
    # Every .dlq topic in ALL is the twin of a primary topic that declares one.
    for t in ALL:
        if t.name.endswith(".dlq"):
            source = by_name(t.name.removesuffix(".dlq"))
            assert source.has_dlq
            assert source.dlq == t
    assert len(ALL) == len(_PRIMARY) + sum(t.has_dlq for t in _PRIMARY)


@pytest.mark.parametrize("spec", [t for t in ALL if not t.has_dlq], ids=lambda t: t.name)
def test_dlq_on_spec_without_dlq_raises(spec: TopicSpec) -> None:
    with pytest.raises(KeyError, match=re.escape(spec.name)):
        _ = spec.dlq


@pytest.mark.parametrize("spec", ALL, ids=lambda t: t.name)
def test_configs(spec: TopicSpec) -> None:
    configs = spec.configs
    assert configs["retention.ms"] == str(spec.retention_ms)
    assert int(configs["retention.ms"]) > 0
    assert configs["cleanup.policy"] == spec.cleanup_policy
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in configs.items())
    assert spec.partitions >= 1
    assert spec.key


@pytest.mark.parametrize("spec", [t for t in ALL if t.schema is not None], ids=lambda t: t.name)
def test_schemas_are_registered(spec: TopicSpec) -> None:
    assert spec.schema is not None
    assert issubclass(spec.schema, Message)
    assert registry[(spec.schema.SCHEMA, spec.schema.VERSION)] is spec.schema


def test_extra_configs_are_merged() -> None:
    spec = TopicSpec("x", 1, "k", None, extra_configs={"min.insync.replicas": "2"})
    assert spec.configs == {
        "retention.ms": str(spec.retention_ms),
        "cleanup.policy": "delete",
        "min.insync.replicas": "2",
    }


def test_by_name() -> None:
    for spec in ALL:
        assert by_name(spec.name) is spec
    with pytest.raises(KeyError, match=r"llm\.nope"):
        by_name("llm.nope")


# --- provision ---------------------------------------------------------------------------


class FakeAdmin:
    def __init__(self, existing: Mapping[str, int] | None = None) -> None:
        self.topics: dict[str, int] = dict(existing or {})
        self.create_calls: list[list[str]] = []

    def existing_partitions(self) -> Mapping[str, int]:
        return dict(self.topics)

    def create(self, specs: Iterable[TopicSpec]) -> None:
        specs = list(specs)
        self.create_calls.append([s.name for s in specs])
        for s in specs:
            self.topics.setdefault(s.name, s.partitions)


def test_provision_creates_everything_on_empty_broker() -> None:
    admin = FakeAdmin()
    report = provision(admin, ALL)
    assert sorted(report.created) == sorted(NAMES)
    assert report.existing == [] and report.mismatched == []
    assert admin.create_calls == [NAMES]  # one batch, in declaration order
    assert admin.topics == {t.name: t.partitions for t in ALL}


def test_provision_creates_only_missing() -> None:
    first, second, *rest = ALL
    admin = FakeAdmin({first.name: first.partitions, second.name: second.partitions, "other": 3})
    report = provision(admin, ALL)
    assert report.created == [t.name for t in rest]
    assert report.existing == [first.name, second.name]
    assert admin.create_calls == [[t.name for t in rest]]


def test_provision_is_idempotent() -> None:
    admin = FakeAdmin()
    provision(admin, ALL)
    report = provision(admin, ALL)
    assert report.created == []
    assert report.mismatched == []
    assert sorted(report.existing) == sorted(NAMES)
    assert len(admin.create_calls) == 1  # create() not called again


def test_provision_with_nothing_missing_does_not_call_create() -> None:
    admin = FakeAdmin({t.name: t.partitions for t in ALL})
    provision(admin, ALL)
    assert admin.create_calls == []


def test_provision_reports_partition_mismatch_without_creating(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = by_name("llm.requests")
    others = {t.name: t.partitions for t in ALL if t is not spec}
    admin = FakeAdmin({**others, spec.name: spec.partitions + 2})
    with caplog.at_level(logging.WARNING, logger="topics.provision"):
        report = provision(admin, ALL)
    assert report.created == []
    assert spec.name not in report.existing
    assert report.mismatched == [
        f"{spec.name}: {spec.partitions + 2} partitions, declared {spec.partitions}"
    ]
    assert admin.create_calls == []
    assert admin.topics[spec.name] == spec.partitions + 2  # never changed
    assert any(spec.name in r.getMessage() for r in caplog.records)


# --- topic names are spelled only in topics/ ---------------------------------------------


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                ids.add(id(body[0].value))
    return ids


def _schema_name_nodes(tree: ast.AST) -> set[int]:
    """``SCHEMA = "llm.x"`` names a message schema, not a topic."""
    ids = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "SCHEMA"
            and isinstance(node.value, ast.Constant)
        ):
            ids.add(id(node.value))
    return ids


_NAME_RE = re.compile(
    r"(?<![\w.])(" + "|".join(re.escape(n) for n in sorted(NAMES, key=len, reverse=True)) + r")"
    r"(?![\w])"
)


def _topic_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _docstring_nodes(tree) | _schema_name_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and _NAME_RE.search(node.value)
        ):
            found.append(f"{path}:{node.lineno}: {node.value!r}")
    return found


def test_name_pattern_catches_names() -> None:
    assert _NAME_RE.search('"llm.requests"')
    assert _NAME_RE.search("sent to llm.requests.dlq")
    assert not _NAME_RE.search("xllm.requests")
    assert not _NAME_RE.search("llm.request")  # a schema name, not a topic


def test_literal_scan_flags_code_but_not_docs(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        '"""Reads llm.requests."""\n'
        "class M:\n"
        '    """Writes llm.responses."""\n'
        '    SCHEMA: str = "llm.feedback"\n'
        'TOPIC = "llm.requests"\n'
        'DLQ = f"{TOPIC}.dlq and llm.generations.dlq"\n'
    )
    hits = _topic_literals(src)
    assert [h.split(":")[1] for h in hits] == ["5", "6"]


def test_no_topic_name_literals_outside_topics() -> None:
    files = [
        p
        for pkg in ("services", "processors", "kllm", "schemas", "loadtest", "tests", "eval")
        for p in sorted((REPO / pkg).rglob("*.py"))
        if p.resolve() != Path(__file__).resolve()  # this file spells names to test the scan
    ]
    assert len(files) > 10
    offenders = [hit for f in files for hit in _topic_literals(f)]
    assert offenders == [], "topic names belong in topics/ only:\n" + "\n".join(offenders)


# --- consumer group names are spelled only in topics/groups.py ----------------------------

GROUP_NAMES = sorted({g.name for g in groups()} | set(READER_GROUPS))
_GROUP_RE = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, GROUP_NAMES)) + r")(?![\w-])")


def _group_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _docstring_nodes(tree)
    return [
        f"{path}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and _GROUP_RE.search(node.value)
    ]


def test_group_pattern_catches_group_names_only() -> None:
    assert _GROUP_RE.search('"group.id": "kllm-drift"')
    assert _GROUP_RE.search("kllm-cache")
    assert not _GROUP_RE.search("kllm-drift-state")  # a volume claim, not a group
    assert not _GROUP_RE.search("x-kllm-cache")
    assert not _GROUP_RE.search("kllm-gateway")  # the gateway has no group


def test_no_group_name_literals_outside_the_declaration() -> None:
    files = [
        p
        for pkg in ("services", "processors", "kllm", "schemas", "topics", "tests", "loadtest")
        for p in sorted((REPO / pkg).rglob("*.py"))
        if p.resolve() != Path(__file__).resolve()
    ]
    assert len(files) > 10
    offenders = [hit for f in files for hit in _group_literals(f)]
    assert offenders == [], "group names belong in topics/groups.py only:\n" + "\n".join(offenders)
