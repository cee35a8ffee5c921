"""Output moderation policies per tenant, kept as versioned TOML files.

``policies/moderation/v<N>.toml`` holds a ``[default]`` table and optional
``[tenants.<id>]`` tables that override it key by key. A published file is
never edited: a change is a new version, and the newest version is the one in
force. Every response records the policy it was moderated under, as
``moderation@v<N>/<tenant or default>``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kllm.core.errors import ConfigError

_FILE = re.compile(r"^v([1-9][0-9]*)\.toml$")
_KEYS = frozenset({"max_chars", "deny_topics", "block_patterns", "redact_patterns"})


@dataclass(frozen=True)
class Policy:
    version: int
    scope: str  # the tenant whose table applied, or "default"
    max_chars: int | None = None
    deny_topics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Topic -> phrases; an answer containing one (case-insensitive) is blocked."""
    block_patterns: tuple[re.Pattern[str], ...] = ()
    redact_patterns: tuple[re.Pattern[str], ...] = ()

    @property
    def tag(self) -> str:
        return f"moderation@v{self.version}/{self.scope}"


class PolicyBook:
    def __init__(self, version: int, default: Policy, tenants: Mapping[str, Policy]) -> None:
        self.version = version
        self.default = default
        self.tenants = dict(tenants)

    def for_tenant(self, tenant: str) -> Policy:
        return self.tenants.get(tenant, self.default)


def load_policies(folder: Path) -> PolicyBook:
    """The newest ``v<N>.toml`` in ``folder``. A missing folder, or one with no policy
    file, is a ConfigError: a stage never runs on a silently empty policy."""
    if not folder.is_dir():
        raise ConfigError(f"moderation policy folder {folder} does not exist")
    versions = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name)))
    if not versions:
        raise ConfigError(f"no moderation policy (v<N>.toml) in {folder}")
    version, path = versions[-1]
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(raw) - {"default", "tenants"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown tables {sorted(unknown)}; use [default], [tenants.<id>]"
        )
    base = _table(raw.get("default", {}), path, "default")
    default = _policy(version, "default", base, path)
    tenants = {
        tenant: _policy(version, tenant, base | _table(table, path, f"tenants.{tenant}"), path)
        for tenant, table in _table(raw.get("tenants", {}), path, "tenants").items()
    }
    return PolicyBook(version, default, tenants)


def _table(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{where}] must be a table")
    return value


def _policy(version: int, scope: str, spec: Mapping[str, Any], path: Path) -> Policy:
    unknown = set(spec) - _KEYS
    if scope != "default":
        unknown.discard("tenants")
    if unknown:
        raise ConfigError(
            f"{path}: [{scope}] unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}"
        )
    max_chars = spec.get("max_chars")
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise ConfigError(f"{path}: [{scope}] max_chars must be a positive integer")
    topics = _table(spec.get("deny_topics", {}), path, f"{scope}.deny_topics")
    where = f"{path}: [{scope}]"
    try:
        return Policy(
            version=version,
            scope=scope,
            max_chars=max_chars,
            deny_topics={
                t: tuple(p.lower() for p in _strings(v, f"{where} deny_topics.{t}"))
                for t, v in topics.items()
            },
            block_patterns=tuple(
                re.compile(p) for p in _strings(spec.get("block_patterns", []), where)
            ),
            redact_patterns=tuple(
                re.compile(p) for p in _strings(spec.get("redact_patterns", []), where)
            ),
        )
    except re.error as exc:
        raise ConfigError(f"{where} bad pattern: {exc}") from exc


def _strings(value: Any, where: str) -> list[str]:
    # A bare string would iterate as characters: one-letter phrases matching everything.
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return value
