"""Versioned prompt templates with deterministic, weighted A/B variants.

Templates live in ``prompts/<name>/v<N>.toml``; a published file is never edited, so the
tag ``<name>@v<N>/<variant>`` recorded on a response always names the exact prompt used.
A request's variant is a pure function of (name, version, request id): a retried or
replayed request keeps its variant, and any process can recompute it without shared state.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kllm.core.errors import ConfigError

# Names and ids may not contain '@' or '/', which separate the parts of a tag.
_NAME = r"[a-z0-9][a-z0-9_-]*"
_VARIANT_ID = r"[A-Za-z0-9_-]+"
_NAME_RE = re.compile(_NAME)
_VARIANT_ID_RE = re.compile(_VARIANT_ID)
_FILE_RE = re.compile(r"v([0-9]+)\.toml")
_TAG_RE = re.compile(rf"({_NAME})@v([0-9]+)/({_VARIANT_ID})")
_VARIANT_KEYS = frozenset({"weight", "system"})
_TEMPLATE_KEYS = frozenset({"description", "client_instructions", "variants"})


@dataclass(frozen=True)
class Variant:
    id: str
    weight: float
    system: str


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    variants: tuple[Variant, ...]
    description: str = ""
    locks_instructions: bool = False
    """Whether the caller's own system and developer turns are left out."""


@dataclass(frozen=True)
class Assignment:
    tag: str
    """``<name>@v<version>/<variant>``, e.g. ``rag@v2/b``."""
    system: str
    locks_instructions: bool = False


def format_tag(name: str, version: int, variant_id: str) -> str:
    return f"{name}@v{version}/{variant_id}"


def parse_tag(tag: str) -> tuple[str, int, str]:
    """``"rag@v2/b"`` -> ``("rag", 2, "b")``."""
    match = _TAG_RE.fullmatch(tag)
    if match is None:
        raise ConfigError(f"malformed template tag {tag!r}: expected '<name>@v<N>/<variant>'")
    return match[1], int(match[2]), match[3]


def bucket(name: str, version: int, request_id: str) -> float:
    """A uniform number in [0, 1) fixed by its inputs (unlike ``hash()``, stable across
    processes). The version is part of the key so a new version draws a fresh split."""
    key = f"{name}\x00{version}\x00{request_id}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(variants: tuple[Variant, ...], u: float) -> Variant:
    """The variant whose slice of the cumulative normalised weights holds ``u``."""
    total = math.fsum(v.weight for v in variants)
    edge = 0.0
    for variant in variants:
        edge += variant.weight / total
        if u < edge:
            return variant
    return variants[-1]  # rounding can leave the last edge just below 1.0


class TemplateCatalog:
    """Every loaded template version, looked up by name and version."""

    def __init__(self, templates: Iterable[Template]) -> None:
        self._by_name: dict[str, dict[int, Template]] = {}
        for template in templates:
            versions = self._by_name.setdefault(template.name, {})
            if template.version in versions:
                raise ConfigError(f"duplicate template {template.name!r} v{template.version}")
            versions[template.version] = template

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_name))

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self._versions(name)))

    def latest(self, name: str) -> Template:
        versions = self._versions(name)
        return versions[max(versions)]

    def get(self, name: str, version: int) -> Template:
        versions = self._versions(name)
        if version not in versions:
            known = ", ".join(f"v{v}" for v in sorted(versions))
            raise ConfigError(f"unknown version v{version} of template {name!r}; known: {known}")
        return versions[version]

    def assign(self, name: str, request_id: str, *, version: int | None = None) -> Assignment:
        """The request's variant of ``name`` (latest version unless pinned)."""
        template = self.latest(name) if version is None else self.get(name, version)
        variant = pick(template.variants, bucket(name, template.version, request_id))
        tag = format_tag(name, template.version, variant.id)
        return Assignment(tag, variant.system, template.locks_instructions)

    def render(self, tag: str) -> str:
        """The system prompt a tag names."""
        name, version, variant_id = parse_tag(tag)
        template = self.get(name, version)
        for variant in template.variants:
            if variant.id == variant_id:
                return variant.system
        known = ", ".join(v.id for v in template.variants)
        raise ConfigError(f"unknown variant in tag {tag!r}; {name}@v{version} has: {known}")

    def _versions(self, name: str) -> dict[int, Template]:
        if name not in self._by_name:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"unknown template {name!r}; known: {known}")
        return self._by_name[name]


# --- loading -------------------------------------------------------------------------------


def load_templates(folder: Path) -> TemplateCatalog:
    """Read every ``<name>/v<N>.toml`` under ``folder``; other non-TOML files are ignored."""
    if not folder.is_dir():
        raise ConfigError(f"prompt template folder {folder} does not exist")
    stray = sorted(p for p in folder.glob("*.toml") if p.is_file())
    if stray:
        raise ConfigError(f"{stray[0]}: template files belong in <name>/v<N>.toml")
    seen: dict[tuple[str, int], Path] = {}
    templates = []
    for path in sorted(folder.glob("*/*.toml")):
        template = load_template(path)
        key = (template.name, template.version)
        if key in seen:
            raise ConfigError(f"{path}: duplicate version v{key[1]}, already in {seen[key]}")
        seen[key] = path
        templates.append(template)
    return TemplateCatalog(templates)


def load_template(path: Path) -> Template:
    """One ``<name>/v<N>.toml`` file; every error names the file."""
    name, version = _name_and_version(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{path}: 'description' must be a string")
    client = data.get("client_instructions", "follow")
    if client not in ("follow", "drop"):
        raise ConfigError(f'{path}: \'client_instructions\' must be "follow" or "drop"')
    unknown = sorted(set(data) - _TEMPLATE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(_TEMPLATE_KEYS)}")
    variants = _variants(path, data.get("variants"))
    return Template(name, version, variants, description, client == "drop")


def _name_and_version(path: Path) -> tuple[str, int]:
    name = path.parent.name
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{path}: template folder name must match {_NAME}")
    match = _FILE_RE.fullmatch(path.name)
    if match is None or int(match[1]) < 1:
        raise ConfigError(f"{path}: template file name must be v<N>.toml with N >= 1")
    return name, int(match[1])


def _variants(path: Path, table: object) -> tuple[Variant, ...]:
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{path}: needs at least one [variants.<id>] table")
    # Sorted by id so the split does not depend on the order tables appear in the file.
    return tuple(_variant(path, str(vid), table[vid]) for vid in sorted(table))


def _variant(path: Path, vid: str, body: object) -> Variant:
    where = f"{path}: variant {vid!r}"
    if not _VARIANT_ID_RE.fullmatch(vid):
        raise ConfigError(f"{where}: id must match {_VARIANT_ID}")
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be a table with 'weight' and 'system'")
    fields: Mapping[str, Any] = body
    unknown = sorted(set(fields) - _VARIANT_KEYS)
    if unknown:  # a typo such as 'sytem' would otherwise pass as a missing key
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: weight, system")
    return Variant(vid, _weight(where, fields.get("weight")), _system(where, fields.get("system")))


def _weight(where: str, weight: object) -> float:
    # bool is an int subclass; 'weight = true' is a mistake, not 1.
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ConfigError(f"{where}: 'weight' must be a number, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{where}: 'weight' must be a finite number > 0, got {weight!r}")
    return float(weight)


def _system(where: str, system: object) -> str:
    if not isinstance(system, str) or not system.strip():
        raise ConfigError(f"{where}: 'system' must be a non-empty string")
    return system
