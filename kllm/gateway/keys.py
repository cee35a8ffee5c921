"""API keys mapped to tenants, stored hashed in a JSON file.

A key is shown once, when created; the file keeps its SHA-256 only (keys are
32 random bytes, so a plain hash is enough: there is nothing to brute-force).
The gateway rereads the file when it changes, so `kllm keys revoke` takes
effect without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kllm.core.errors import ConfigError

PREFIX = "kllm-"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    sha256: str
    created_at: float
    name: str = ""
    revoked_at: float | None = None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path, reload_every_s: float = 1.0) -> None:
        self.path = path
        self.reload_every_s = reload_every_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._version: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load()

    def records(self) -> list[KeyRecord]:
        return sorted(self._by_hash.values(), key=lambda r: r.created_at)

    def tenant_for(self, secret: str) -> str | None:
        """The tenant of a live key, or None for an unknown or revoked one."""
        now = time.monotonic()
        h = digest(secret)
        # Revocations show up within reload_every_s; a new key at once (one stat call).
        if now - self._checked >= self.reload_every_s or h not in self._by_hash:
            self._checked = now
            self._load()
        record = self._by_hash.get(h)
        return record.tenant if record and record.revoked_at is None else None

    def create(self, tenant: str, name: str = "") -> tuple[KeyRecord, str]:
        """A new key for ``tenant``: its record, and the secret (shown once)."""
        if not tenant or len(tenant) > 64:
            raise ConfigError("tenant must be 1 to 64 characters")
        self._load()
        secret = PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="key_" + secrets.token_hex(6),
            tenant=tenant,
            sha256=digest(secret),
            created_at=time.time(),
            name=name,
        )
        self._by_hash[record.sha256] = record
        self._save()
        return record, secret

    def revoke(self, key_id: str) -> KeyRecord:
        self._load()
        for h, record in self._by_hash.items():
            if record.id == key_id:
                revoked = KeyRecord(**{**asdict(record), "revoked_at": time.time()})
                self._by_hash[h] = revoked
                self._save()
                return revoked
        raise ConfigError(f"no key with id {key_id!r} in {self.path}")

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._version = {}, None
            return
        # Every save replaces the file: inode, time and size together mark a version.
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version == self._version:
            return
        try:
            raw = json.loads(self.path.read_text())
            records = [KeyRecord(**r) for r in raw["keys"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the key file {self.path}: {exc}") from exc
        self._by_hash = {r.sha256: r for r in records}
        self._version = version

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body = {"version": 1, "keys": [asdict(r) for r in self.records()]}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
        os.replace(tmp, self.path)  # atomic: a reading gateway sees the old or the new file
        st = self.path.stat()
        self._version = (st.st_ino, st.st_mtime_ns, st.st_size)
