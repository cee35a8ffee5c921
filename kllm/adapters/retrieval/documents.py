"""Files to corpus documents: Markdown, text and PDF, with ids and versions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from kllm.core.errors import PipelineError
from schemas import Document

SUFFIXES = {".md", ".markdown", ".txt", ".pdf"}


class UnreadableFile(PipelineError):
    pass


MAX_DOCUMENT_BYTES = 900_000
"""Below Kafka's default 1 MB record limit; split larger documents before ingesting."""


def find_files(paths: list[Path]) -> Iterator[tuple[Path, Path]]:
    """(file, root) pairs: a file given directly is its own root's child; folders are walked."""
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in SUFFIXES:
                    yield f, path
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UnreadableFile(
                    f"{path}: not a supported file ({', '.join(sorted(SUFFIXES))})"
                )
            yield path, path.parent
        else:
            raise UnreadableFile(f"{path}: no such file or folder")


def read_text(path: Path) -> str:
    try:
        if path.suffix.lower() == ".pdf":
            from pypdf import PdfReader
            from pypdf.errors import PdfReadError

            try:
                return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
            except PdfReadError as exc:
                raise UnreadableFile(f"{path}: not a readable PDF ({exc})") from exc
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise UnreadableFile(f"{path}: {exc.strerror}") from exc


def doc_id_of(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def document_for(path: Path, root: Path, tenant: str, delete: bool = False) -> Document:
    """The document for a file; its modification time (ms) is its version, so
    re-ingesting an unchanged file is a no-op and an edited one replaces it."""
    doc_id = doc_id_of(path, root)
    if delete:
        # Newer than any stored version: the file's mtime would lose to a later edit's.
        return Document(
            tenant=tenant, doc_id=doc_id, op="delete", version=time.time_ns() // 1_000_000
        )
    return Document(
        tenant=tenant, doc_id=doc_id, text=read_text(path), source=path.name, version=_version(path)
    )


def _version(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns // 1_000_000
    except OSError:
        return 0


def seed_documents(seed_dir: Path, tenant: str) -> list[Document]:
    """The seed corpus (Markdown and text files) as ``tenant``'s documents, read as
    `kllm ingest` reads files: the relative path is the id, the mtime the version."""
    files = sorted(p for p in seed_dir.glob("**/*") if p.suffix in {".md", ".txt"})
    return [document_for(p, seed_dir, tenant) for p in files]
