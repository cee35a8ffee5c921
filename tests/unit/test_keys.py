from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from kllm.core.errors import ConfigError
from kllm.gateway.keys import KeyStore


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "keys.json"


def test_create_returns_a_secret_stored_only_hashed(path: Path) -> None:
    store = KeyStore(path)
    record, secret = store.create("acme", name="ci")
    assert secret.startswith("kllm-")
    assert len(secret) > 30
    assert record.tenant == "acme"
    assert record.name == "ci"
    assert record.revoked_at is None
    text = path.read_text()
    assert secret not in text
    assert secret.removeprefix("kllm-") not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert record.sha256 == hashlib.sha256(secret.encode()).hexdigest()


def test_secrets_and_ids_are_unique(path: Path) -> None:
    store = KeyStore(path)
    (r1, s1), (r2, s2) = store.create("acme"), store.create("acme")
    assert s1 != s2
    assert r1.id != r2.id
    assert [r.id for r in store.records()] == [r1.id, r2.id]


def test_file_mode_is_owner_only(path: Path) -> None:
    KeyStore(path).create("acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tenant_for_live_and_unknown_keys(path: Path) -> None:
    store = KeyStore(path)
    _, a = store.create("acme")
    _, b = store.create("beta")
    assert store.tenant_for(a) == "acme"
    assert store.tenant_for(b) == "beta"
    assert store.tenant_for("kllm-not-a-key") is None
    assert store.tenant_for("") is None


def test_a_missing_file_is_an_empty_store(path: Path) -> None:
    store = KeyStore(path)
    assert store.records() == []
    assert store.tenant_for("kllm-anything") is None
    assert not path.exists()


def test_revoke_in_same_store(path: Path) -> None:
    store = KeyStore(path)
    record, secret = store.create("acme")
    _, other = store.create("acme")
    revoked = store.revoke(record.id)
    assert revoked.id == record.id
    assert revoked.revoked_at is not None
    assert store.tenant_for(secret) is None
    assert store.tenant_for(other) == "acme"


def test_revocation_by_another_store_is_seen_after_reload(path: Path) -> None:
    admin = KeyStore(path)
    record, secret = admin.create("acme")
    gateway = KeyStore(path, reload_every_s=0)
    assert gateway.tenant_for(secret) == "acme"
    KeyStore(path).revoke(record.id)
    assert gateway.tenant_for(secret) is None


def test_revocation_persists_for_new_readers(path: Path) -> None:
    store = KeyStore(path)
    record, secret = store.create("acme")
    store.revoke(record.id)
    fresh = KeyStore(path)
    assert fresh.tenant_for(secret) is None
    (only,) = fresh.records()
    assert only.revoked_at is not None


def test_key_created_elsewhere_is_seen_at_once(path: Path) -> None:
    gateway = KeyStore(path, reload_every_s=3600)
    assert gateway.tenant_for("kllm-warmup") is None  # loaded (and checked) just now
    _, secret = KeyStore(path).create("acme")
    assert gateway.tenant_for(secret) == "acme"  # no waiting for the reload interval


def test_two_stores_creating_keep_each_others_keys(path: Path) -> None:
    a, b = KeyStore(path), KeyStore(path)
    _, sa = a.create("acme")
    _, sb = b.create("beta")  # b rereads the file before writing
    fresh = KeyStore(path)
    assert fresh.tenant_for(sa) == "acme"
    assert fresh.tenant_for(sb) == "beta"


def test_revoke_unknown_id_raises(path: Path) -> None:
    store = KeyStore(path)
    store.create("acme")
    with pytest.raises(ConfigError, match="key_nope"):
        store.revoke("key_nope")


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"keys": [{"id": "x"}]}', '{"nokeys": []}']
)
def test_corrupt_file_raises_with_path(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        KeyStore(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("tenant", ["", "t" * 65])
def test_bad_tenant_raises(path: Path, tenant: str) -> None:
    store = KeyStore(path)
    with pytest.raises(ConfigError, match="tenant"):
        store.create(tenant)
    assert not path.exists()


def test_tenant_of_64_characters_is_fine(path: Path) -> None:
    store = KeyStore(path)
    _, secret = store.create("t" * 64)
    assert store.tenant_for(secret) == "t" * 64
