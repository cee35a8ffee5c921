"""The durable broker's storage server: conditional writes that hold, exact times."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kllm.ops.broker import free_port
from kllm.ops.objectstore import BUCKET, serve


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = serve(tmp_path, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/{BUCKET}"
    server.shutdown()
    server.server_close()


def test_if_none_match_star_creates_once(store: str) -> None:
    with httpx.Client() as http:
        assert (
            http.put(f"{store}/a", content=b"1", headers={"If-None-Match": "*"}).status_code == 200
        )
        again = http.put(f"{store}/a", content=b"2", headers={"If-None-Match": "*"})
        assert again.status_code == 412
        assert http.get(f"{store}/a").content == b"1"


def test_if_match_writes_only_over_the_named_version(store: str) -> None:
    with httpx.Client() as http:
        etag = http.put(f"{store}/w", content=b"v1").headers["ETag"]
        stale = http.put(f"{store}/w", content=b"v2", headers={"If-Match": '"0000"'})
        assert stale.status_code == 412
        ok = http.put(f"{store}/w", content=b"v2", headers={"If-Match": etag})
        assert ok.status_code == 200
        assert http.put(f"{store}/w", content=b"v3", headers={"If-Match": etag}).status_code == 412
        missing = http.put(f"{store}/none", content=b"x", headers={"If-Match": etag})
        assert missing.status_code == 412
        assert http.get(f"{store}/w").content == b"v2"


def test_concurrent_read_modify_write_loses_no_update(store: str) -> None:
    """What the broker does to a partition's watermark: read, add, put If-Match, retry."""
    with httpx.Client() as http:
        http.put(f"{store}/counter", content=b"0")

    def add(times: int) -> None:
        with httpx.Client() as http:
            for _ in range(times):
                while True:
                    got = http.get(f"{store}/counter")
                    value = int(got.content) + 1
                    put = http.put(
                        f"{store}/counter",
                        content=str(value).encode(),
                        headers={"If-Match": got.headers["ETag"]},
                    )
                    if put.status_code == 200:
                        break
                    assert put.status_code == 412

    threads = [threading.Thread(target=add, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client() as http:
        assert int(http.get(f"{store}/counter").content) == 200


def test_listings_carry_microseconds(store: str) -> None:
    with httpx.Client() as http:
        http.put(f"{store}/t/a", content=b"x")
        listing = http.get(store, params={"list-type": "2", "prefix": "t/"}).text
    stamps = re.findall(r"<LastModified>([^<]+)</LastModified>", listing)
    assert stamps and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamps[0])
