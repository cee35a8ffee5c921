"""The embedded broker's storage server: localbucket, with conditional writes that hold.

The durable embedded broker (Tansu on ``s3://``) keeps every record batch, watermark,
consumer group and committed offset as an object. It updates the watermark and the
group objects by optimistic concurrency: read the object and its ETag, then write it
back with ``If-Match: <etag>``, and retry on 412. localbucket (PyPI, objects as plain
files, atomic rename) honours ``If-None-Match: *`` but writes an ``If-Match`` put
blindly, so two producers on one partition both take the same offset and one of them
is refused (measured: 1,200 of 1,800 concurrent records refused, the watermark left
behind). This handler checks ``If-Match`` and ``If-None-Match`` against the object's
current ETag under a per-object lock, so each conditional write is one atomic step, and
serves a read under the same lock, so its body and ETag are of one version.

Two more things the broker needs of its store:
- Listings carry each object's time to the microsecond. Tansu answers ListOffsets from
  the newest (latest) or oldest (earliest) batch object by that time; localbucket's
  whole seconds tie every batch of a second, and the end offset it reported lagged the
  true end by up to a second of records.
- Tansu's s3 engine never deletes a record (no retention, DeleteRecords unimplemented),
  so this server trims each declared topic to its retention (kllm.ops.retention).

Run as ``python -m kllm.ops.objectstore DATA_DIR --port N``; the supervisor does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import localbucket

from kllm.ops.retention import Trimmer

log = logging.getLogger(__name__)

BUCKET = "kllm"
"""The one bucket the broker writes to (created at start)."""


class _ObjectLocks:
    """One lock per object path, made on first use; a put holds it from check to rename."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    def of(self, path: Path) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(path)
            if lock is None:
                lock = self._locks[path] = threading.Lock()
            return lock


class ConditionalS3Handler(localbucket.S3Handler):  # type: ignore[misc]  # untyped
    """localbucket's handler, with If-Match and If-None-Match checked atomically."""

    locks = _ObjectLocks()
    # A read answers in two writes (headers, then body): with Nagle's algorithm on, the
    # body waited for the client's delayed ACK, 40 ms per GET (measured: p50 44 ms
    # against 1-2 ms for a put), and a fetch makes several.
    disable_nagle_algorithm = True
    fsync = False
    """Flush each object to disk before it is acknowledged (survives power loss,
    not only a killed process); off by default: the page cache outlives kill -9."""

    def _write_object(self, bucket: str, key: str, write: Callable[[IO[bytes]], str]) -> str:
        target: Path = self._object_path(bucket, key)
        with self.locks.of(target):
            self._check_preconditions(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{localbucket.TEMP_PREFIX}{threading.get_ident()}")
            try:
                with open(tmp, "wb") as out:
                    etag = write(out)
                    if self.fsync:
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            localbucket.remember_etag(target, etag)
            return etag

    def _get(self, bucket: str, key: str, include_body: bool) -> None:
        # localbucket reads the body, then the ETag from the path: a put in between gave
        # the old body with the new ETag, and a read-modify-write on it lost an update.
        with self.locks.of(self._object_path(bucket, key)):
            super()._get(bucket, key, include_body)

    def _check_preconditions(self, target: Path) -> None:
        if_none_match = self.headers.get("If-None-Match", "").strip()
        if_match = self.headers.get("If-Match", "").strip()
        exists = target.is_file()
        if (
            if_none_match
            and exists
            and (
                if_none_match == "*"
                or localbucket.etag_matches(if_none_match, localbucket.object_etag(target))
            )
        ):
            raise self._precondition_failed_error()
        if if_match and (
            not exists or not localbucket.etag_matches(if_match, localbucket.object_etag(target))
        ):
            raise self._precondition_failed_error()

    def _list_entries(
        self,
        bucket_dir: Path,
        prefix: str,
        delimiter: str,
        marker: str,
        marker_is_prefix: bool,
        max_keys: int,
    ) -> tuple[list[tuple[str, Path]], list[str], bool, str]:
        # localbucket walks the whole bucket for every listing and then filters by
        # prefix: each fetch of a partition cost a walk of every object of every topic
        # (the durable pipeline fell behind at 10 requests/s). Walk only the prefix's
        # folder, and give back keys, prefixes and the marker relative to the bucket.
        folder, _, rest = prefix.rpartition("/")
        parts = folder.split("/") if folder else []
        if not parts or any(p in ("", ".", "..") for p in parts):
            return super()._list_entries(  # type: ignore[no-any-return]
                bucket_dir, prefix, delimiter, marker, marker_is_prefix, max_keys
            )
        base = folder + "/"
        root = bucket_dir.joinpath(*parts)
        if marker.startswith(base):
            marker = marker[len(base) :]
        elif marker.encode() > base.encode():
            return [], [], False, ""  # every key under the folder sorts before the marker
        else:
            marker, marker_is_prefix = "", False
        if not root.is_dir():
            return [], [], False, ""
        contents, prefixes, truncated, last = super()._list_entries(
            root, rest, delimiter, marker, marker_is_prefix, max_keys
        )
        return (
            [(base + key, path) for key, path in contents],
            [base + common for common in prefixes],
            truncated,
            last[:2] + base + last[2:] if last else "",
        )

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: the broker makes several per record batch."""


def _iso_microseconds(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def serve(data_dir: Path, host: str, port: int, *, fsync: bool = False) -> ThreadingHTTPServer:
    """A server on ``host:port`` keeping objects under ``data_dir`` (bucket made here)."""
    # localbucket formats listing times with this module-level function.
    localbucket.iso_timestamp = _iso_microseconds
    data_dir = data_dir.resolve()
    (data_dir / BUCKET).mkdir(parents=True, exist_ok=True)
    ConditionalS3Handler.data_root = data_dir
    ConditionalS3Handler.fsync = fsync
    server = ThreadingHTTPServer((host, port), ConditionalS3Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kllm.ops.objectstore",
        description="S3-compatible storage for the durable embedded broker "
        "(objects as files under DATA_DIR, conditional writes atomic).",
    )
    parser.add_argument("data_dir", type=Path, help="folder that holds the bucket")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--fsync", action="store_true", help="fsync every object before acknowledging it"
    )
    parser.add_argument(
        "--retention-cap-s",
        type=float,
        default=0.0,
        help="keep a record batch at most this long (default 0: the topic's retention)",
    )
    parser.add_argument(
        "--trim-every-s", type=float, default=30.0, help="seconds between trims (default 30)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger(localbucket.__name__).setLevel(logging.WARNING)
    try:
        server = serve(args.data_dir, args.host, args.port, fsync=args.fsync)
    except OSError as exc:
        print(f"objectstore: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"objectstore serving {args.data_dir} on http://{args.host}:{args.port}", flush=True)
    trimmer = Trimmer(args.data_dir / BUCKET, cap_s=args.retention_cap_s)
    stop = threading.Event()
    threading.Thread(
        target=trimmer.run, args=(stop, args.trim_every_s), name="retention", daemon=True
    ).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
