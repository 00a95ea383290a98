"""miroflow.storage against a real S3 API (moto_server on loopback), plus shards on S3."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from miroflow.data.sample import Sample
from miroflow.data.shards import iter_shard, make_webdataset, write_shards
from miroflow.storage import NoSuchBucketError, NotFoundError, Storage, StorageError

# --------------------------------------------------------------------------- a flaky proxy (real HTTP)


class _FlakyProxy:
    """An HTTP proxy on 127.0.0.1 that answers the first ``fail_first`` requests with 503 SlowDown
    and forwards the rest to ``upstream`` unchanged. Counts requests and failures served."""

    def __init__(self, upstream: str, fail_first: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.fail_first = fail_first
        self.requests = 0
        self.failures = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.requests <= proxy.fail_first
                    if fail:
                        proxy.failures += 1
                if fail:
                    xml = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>slow</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    str(len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_proxy(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FlakyProxy]:
    proxy = _FlakyProxy(moto_server, fail_first=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


@pytest.fixture
def storage(moto_server: str) -> Storage:
    return Storage(retries=2, backoff_s=0.01)


# --------------------------------------------------------------------------- basic operations


def test_round_trip_and_stream(storage: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/a/b/x.bin"
    data = os.urandom(5000)
    assert not storage.exists(uri)
    storage.write_bytes(uri, data)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == data
    stream = storage.open_read(uri)
    try:
        assert stream.read(10) + stream.read() == data
    finally:
        stream.close()
    with storage.open_write(uri) as f:
        f.write(b"second")
    assert storage.read_bytes(uri) == b"second"
    assert storage.local_path(uri) is None
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(NotFoundError, match=f"s3://{s3_bucket}/a/b/x.bin"):
        storage.read_bytes(uri)


def test_list_by_prefix(storage: Storage, s3_bucket: str) -> None:
    names = ["shards/train-000001.tar", "shards/train-000000.tar", "shards/val-000000.tar", "scores/x.parquet"]
    for n in names:
        storage.write_bytes(f"s3://{s3_bucket}/{n}", b"x")
    assert storage.list(f"s3://{s3_bucket}/shards/train-") == [
        f"s3://{s3_bucket}/shards/train-000000.tar",
        f"s3://{s3_bucket}/shards/train-000001.tar",
    ]
    assert storage.list(f"s3://{s3_bucket}/shards/") == sorted(f"s3://{s3_bucket}/{n}" for n in names[:3])
    assert storage.list(f"s3://{s3_bucket}") == sorted(f"s3://{s3_bucket}/{n}" for n in names)
    assert storage.list(f"s3://{s3_bucket}/none/") == []


def test_many_keys_listed_across_pages(storage: Storage, s3_bucket: str) -> None:
    storage.list_page_size = 3  # force several list_objects_v2 pages
    for i in range(10):
        storage.write_bytes(f"s3://{s3_bucket}/p/{i:05d}", b"")
    out = storage.list(f"s3://{s3_bucket}/p/")
    assert out == [f"s3://{s3_bucket}/p/{i:05d}" for i in range(10)]


def test_open_write_exception_leaves_nothing(storage: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/never.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(uri) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert storage.list(f"s3://{s3_bucket}") == []


def test_missing_bucket_error_names_bucket(storage: Storage, moto_server: str) -> None:
    uri = "s3://no-such-bucket-3f9a/shards/a.tar"
    for op in (storage.read_bytes, storage.exists, storage.open_read, lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(NoSuchBucketError, match="'no-such-bucket-3f9a'") as ei:
            op(uri)
        assert ei.value.bucket == "no-such-bucket-3f9a"
        assert uri in str(ei.value)
    with pytest.raises(NoSuchBucketError, match="no-such-bucket-3f9a"):
        storage.list("s3://no-such-bucket-3f9a/shards/")


def test_reader_never_sees_partial_object(storage: Storage, s3_bucket: str) -> None:
    """A reader polling during a large (multipart) write sees NotFound or the whole object."""
    uri = f"s3://{s3_bucket}/big/blob.bin"
    chunk = os.urandom(1 << 20)
    full = b"".join(bytes([i]) + chunk[1:] for i in range(20))  # 20 MiB, chunks distinguishable
    stop = threading.Event()
    seen = {"missing": 0, "full": 0, "bad": 0}
    reader = Storage(retries=2, backoff_s=0.01)

    def poll() -> None:
        while not stop.is_set():
            try:
                got = reader.read_bytes(uri)
            except NotFoundError:
                seen["missing"] += 1
                continue
            seen["full" if got == full else "bad"] += 1

    t = threading.Thread(target=poll)
    t.start()
    try:
        with storage.open_write(uri) as f:
            for i in range(20):
                f.write(full[i << 20 : (i + 1) << 20])
        while seen["full"] == 0 and t.is_alive():  # let the poller observe the final object
            stop.wait(0.01)
    finally:
        stop.set()
        t.join(timeout=30)
    assert seen["bad"] == 0, seen
    assert seen["missing"] > 0 and seen["full"] > 0, seen
    assert storage.read_bytes(uri) == full


# --------------------------------------------------------------------------- retries


def test_transient_errors_are_retried(flaky_proxy: _FlakyProxy, s3_bucket: str) -> None:
    storage = Storage(retries=3, backoff_s=0.001)
    uri = f"s3://{s3_bucket}/retry.bin"
    flaky_proxy.fail_first = flaky_proxy.requests + 2  # the next two requests get 503 SlowDown
    storage.write_bytes(uri, b"payload")
    assert flaky_proxy.failures == 2
    flaky_proxy.fail_first = flaky_proxy.requests + 3
    assert storage.read_bytes(uri) == b"payload"
    assert flaky_proxy.failures == 5


def test_retries_give_up_with_uri_in_message(flaky_proxy: _FlakyProxy, s3_bucket: str) -> None:
    storage = Storage(retries=1, backoff_s=0.001)
    uri = f"s3://{s3_bucket}/never.bin"
    before = flaky_proxy.requests
    flaky_proxy.fail_first = 10**9
    with pytest.raises(StorageError, match=r"SlowDown.*2 attempt") as ei:
        storage.write_bytes(uri, b"x")
    assert uri in str(ei.value)
    assert flaky_proxy.requests - before == 2  # one try + one retry


def test_not_found_is_not_retried(flaky_proxy: _FlakyProxy, s3_bucket: str) -> None:
    storage = Storage(retries=3, backoff_s=0.001)
    before = flaky_proxy.requests
    with pytest.raises(NotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/missing.bin")
    assert flaky_proxy.requests - before == 1


def test_connection_refused_retries_then_fails(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    uri = "s3://some-bucket/k.bin"
    with pytest.raises(StorageError, match=r"connection failed after 2 attempt") as ei:
        Storage(retries=1, backoff_s=0.001).read_bytes(uri)
    assert uri in str(ei.value)


# --------------------------------------------------------------------------- shards on S3


def _samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [
        Sample(
            key=f"train-{i:08d}",
            image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            caption=f"caption {i}",
            meta={"i": i},
        )
        for i in range(n)
    ]


def test_shards_on_s3_via_iter_shard_and_webdataset(storage: Storage, s3_bucket: str) -> None:
    samples = _samples(7)
    entries = write_shards(samples, f"s3://{s3_bucket}/store/shards", "train", 3, storage, progress=False)
    uris = [e["uri"] for e in entries]
    assert uris == [f"s3://{s3_bucket}/store/shards/train-{i:06d}.tar" for i in range(3)]
    assert [e["n"] for e in entries] == [3, 3, 1]

    recs = [r for u in uris for r in iter_shard(u, storage)]
    assert [r["key"] for r in recs] == [s.key for s in samples]
    assert [r["txt"] for r in recs] == [s.caption for s in samples]
    assert recs[2]["json"] == {"i": 2, "caption": "caption 2"}

    wrecs = list(make_webdataset(uris))
    assert [r["key"] for r in wrecs] == [s.key for s in samples]
    for r, s in zip(wrecs, samples, strict=True):
        assert r["image"].shape == (8, 8, 3)
        np.testing.assert_array_equal(r["image"], s.image)
        assert r["txt"] == s.caption
        assert r["shard"].startswith(f"s3://{s3_bucket}/")
