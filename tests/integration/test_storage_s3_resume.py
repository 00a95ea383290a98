"""S3 streams survive a dropped connection: a real TCP proxy in front of the moto server cuts a
GET response mid-body; ``Storage.open_read`` resumes with a ``Range`` request pinned to the ETag."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from miroflow.data.shards import iter_shard
from miroflow.storage import Storage, StorageError


class CuttingProxy:
    """TCP proxy on 127.0.0.1; once armed, closes the connection after ``cut_after`` response bytes."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.cut_after: int | None = None
        self.on_cut: Callable[[], None] | None = None
        self.cuts = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, cut_after: int, on_cut: Callable[[], None] | None = None) -> None:
        with self._lock:
            self.cut_after, self.on_cut = cut_after, on_cut

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if not response:
                    with self._lock:
                        self.requests.append(data)
                    dst.sendall(data)
                    continue
                with self._lock:
                    limit = self.cut_after
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    with self._lock:
                        self.cut_after, hook, self.on_cut = None, self.on_cut, None
                        self.cuts += 1
                    if hook is not None:
                        hook()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def proxy(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CuttingProxy]:
    p = CuttingProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)  # every Storage client goes through the proxy
    yield p
    p.close()


def _put(moto_server: str, bucket: str, key: str, data: bytes) -> None:
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").put_object(Bucket=bucket, Key=key, Body=data)


def test_stream_resumes_after_a_mid_body_drop(moto_server: str, s3_bucket: str, proxy: CuttingProxy) -> None:
    data = os.urandom(3 * 1024 * 1024)
    _put(moto_server, s3_bucket, "big.bin", data)
    st = Storage(retries=3, backoff_s=0.01)
    proxy.arm(cut_after=700_000)  # the GET's headers + ~0.7 MB of body, then the connection dies
    with st.open_read(f"s3://{s3_bucket}/big.bin") as f:
        got = b"".join(iter(lambda: f.read(64 * 1024), b""))
        resumes = f.resumes  # type: ignore[attr-defined]
    assert proxy.cuts == 1 and resumes >= 1
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    ranges = [r for r in proxy.requests if b"range: bytes=" in r.lower()]
    assert ranges and any(b"if-match" in r.lower() for r in ranges)  # resumed from an offset, pinned to the ETag


def test_shard_streaming_survives_a_drop(moto_server: str, s3_bucket: str, proxy: CuttingProxy, tmp_path: Path) -> None:
    from miroflow.config import Params
    from miroflow.prepare import run_prepare

    params = Params.model_validate(
        {
            "data": {
                "num_samples": 300,
                "shard_size": 300,
                "resolution": 32,
                "manifest": str(tmp_path / "shards.json"),
            },
            "storage": {"root": f"s3://{s3_bucket}/data"},
        }
    )
    st = Storage(retries=3, backoff_s=0.01)
    uri = run_prepare(params, st)["shards"][0]["uri"]
    expected = [r["key"] for r in iter_shard(uri, st)]
    proxy.arm(cut_after=200_000)
    assert [r["key"] for r in iter_shard(uri, st)] == expected and proxy.cuts == 1


def test_without_retries_the_error_names_uri_and_offset(moto_server: str, s3_bucket: str, proxy: CuttingProxy) -> None:
    _put(moto_server, s3_bucket, "big.bin", os.urandom(2 * 1024 * 1024))
    proxy.arm(cut_after=500_000)
    with Storage(retries=0).open_read(f"s3://{s3_bucket}/big.bin") as f:
        with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/big.bin: connection dropped at byte \d+ of 2097152"):
            while f.read(64 * 1024):
                pass


def test_object_replaced_mid_read_is_an_error_not_a_splice(
    moto_server: str, s3_bucket: str, proxy: CuttingProxy
) -> None:
    _put(moto_server, s3_bucket, "big.bin", b"a" * (2 * 1024 * 1024))
    proxy.arm(cut_after=500_000, on_cut=lambda: _put(moto_server, s3_bucket, "big.bin", b"b" * (2 * 1024 * 1024)))
    with Storage(retries=3, backoff_s=0.01).open_read(f"s3://{s3_bucket}/big.bin") as f:
        with pytest.raises(StorageError, match="was replaced while being read"):
            while f.read(64 * 1024):
                pass
