"""The durable broker's storage server: conditional writes that hold, exact times."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from xml.etree import ElementTree

import httpx
import localbucket
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


def _list_all(http: httpx.Client, url: str, **query: str) -> list[str]:
    """Every page of a ListObjectsV2 (keys and common prefixes), tokens followed."""
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    out: list[str] = []
    params = {"list-type": "2", **query}
    for _page in range(100):  # a token that leads back would page forever
        root = ElementTree.fromstring(http.get(url, params=params).content)
        out += [f"key {e.findtext(ns + 'Key')}" for e in root.iter(ns + "Contents")]
        out += [f"prefix {e.findtext(ns + 'Prefix')}" for e in root.iter(ns + "CommonPrefixes")]
        token = root.findtext(ns + "NextContinuationToken")
        if not token:
            return out
        params = {**params, "continuation-token": token}
    raise AssertionError(f"listing {query} never ended")


def test_listing_one_folder_answers_as_a_walk_of_the_whole_bucket(
    tmp_path: Path, store: str
) -> None:
    """Listings walk only the prefix's folder (the whole bucket was walked per fetch);
    pages, delimiters, start-after and odd prefixes answer as localbucket's own walk."""

    class Plain(localbucket.S3Handler):  # type: ignore[misc]
        data_root = tmp_path.resolve()

    port = free_port()
    plain = ThreadingHTTPServer(("127.0.0.1", port), Plain)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    reference = f"http://127.0.0.1:{port}/{BUCKET}"
    keys = [
        f"clusters/c/topics/{t}/partitions/{p:010}/records/{o:020}.batch"
        for t in ("orders", "orders.eu", "ord")
        for p in range(2)
        for o in range(4)
    ] + ["clusters/c/meta.json", "clusters/c/topics/orders/watermark.json", "top"]
    try:
        with httpx.Client() as http:
            for key in keys:
                assert http.put(f"{store}/{key}", content=key.encode()).status_code == 200
            records = "clusters/c/topics/orders/partitions/0000000001/records/"
            queries = [
                {},
                {"prefix": records},
                {"prefix": records, "max-keys": "3"},
                {"prefix": records, "start-after": f"{records}{1:020}.batch"},
                {"prefix": records, "start-after": "clusters/a"},
                {"prefix": records, "start-after": "clusters/z"},
                {"prefix": "clusters/c/topics/ord"},
                {"prefix": "clusters/c/topics/", "delimiter": "/"},
                {"prefix": "clusters/c/topics/", "delimiter": "/", "max-keys": "1"},
                {"prefix": "clusters/c/", "max-keys": "5"},
                {"prefix": "clusters/nowhere/"},
                {"prefix": "clusters/../clusters/c/"},
                {"prefix": "t"},
            ]
            for query in queries:
                ours = _list_all(http, store, **query)
                assert ours == _list_all(http, reference, **query), query
            assert len(_list_all(http, store, prefix=records)) == 4
    finally:
        plain.shutdown()
        plain.server_close()
