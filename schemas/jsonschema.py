"""JSON Schema for every message, generated from the models, for producers and
consumers in other languages.

``python -m schemas.jsonschema`` writes ``schemas/json/<schema>.v<N>.json``; a unit
test fails when a model changes and the files were not written again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from schemas.codec import registry
from schemas.messages import Message

FOLDER = Path(__file__).parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_of(model: type[Message]) -> dict[str, Any]:
    """The model's JSON Schema for the wire, envelope included: ``schema`` and ``v``."""
    body = model.model_json_schema(by_alias=True, mode="validation")
    properties = {
        "schema": {"const": model.SCHEMA, "description": "The message's name."},
        "v": {"const": model.VERSION, "description": "The message's schema version."},
    }
    body["properties"] = properties | body.get("properties", {})
    body["required"] = ["schema", "v", *body.get("required", [])]
    body["additionalProperties"] = False
    return {
        "$schema": DIALECT,
        "$id": f"{model.SCHEMA}.v{model.VERSION}.json",
        **body,
    }


def rendered() -> dict[str, bytes]:
    """File name -> content, for each message at its current version."""
    current = {m for (name, version), m in registry.items() if version == m.VERSION}
    return {
        f"{m.SCHEMA}.v{m.VERSION}.json": orjson.dumps(
            schema_of(m), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for m in sorted(current, key=lambda m: m.SCHEMA)
    }


def write(folder: Path = FOLDER) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = rendered()
    for stale in folder.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    paths = []
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.jsonschema",
        description="Write the JSON Schema of every message into schemas/json/.",
    )
    parser.add_argument("--out", type=Path, default=FOLDER, help="folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
