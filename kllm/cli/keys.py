"""`kllm keys`: create, list and revoke the gateway's API keys."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kllm.gateway.keys import KeyStore
from kllm.runtime.settings import KafkaSettings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="gateway API keys: create, list, revoke (stored hashed)")
    keys.add_argument(
        "--file", type=Path, default=None, help="key file (default: keys.json in the run folder)"
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="new key for a tenant; the key is shown once")
    create.add_argument("--tenant", required=True, help="tenant the key acts for")
    create.add_argument("--name", default="", help="a label, e.g. the front end using it")
    actions.add_parser("list", help="keys with tenant, label, created and revoked times")
    revoke = actions.add_parser("revoke", help="revoke a key by id (effective within a second)")
    revoke.add_argument("key_id", help="the key's id, as `list` shows it")


def cmd_keys(args: argparse.Namespace, _settings: KafkaSettings) -> int:
    from services.gateway import Settings  # the gateway's own default for the key file

    store = KeyStore(args.file or Settings().keys_path())
    if args.action == "create":
        record, secret = store.create(args.tenant, args.name)
        print(f"{record.id}  tenant {record.tenant}\n{secret}")
        print("(store it now: only its hash is kept)")
    elif args.action == "revoke":
        record = store.revoke(args.key_id)
        print(f"{record.id} revoked (tenant {record.tenant})")
    else:
        for r in store.records():
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
            state = "revoked" if r.revoked_at else "active"
            print(f"{r.id}  {r.tenant:16} {state:8} {created}  {r.name}")
    return 0
