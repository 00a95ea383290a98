"""miroflow.storage on local files: round trips, atomic writes, listing, URI parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from miroflow.config import StorageConfig
from miroflow.storage import (
    TMP_MARKER,
    InvalidURIError,
    NotFoundError,
    Storage,
    StorageError,
    from_config,
    join_uri,
    parse_uri,
    sha256_bytes,
)


@pytest.fixture
def storage() -> Storage:
    return Storage(retries=0, backoff_s=0.0)


@pytest.mark.parametrize("form", ["plain", "file"])
def test_round_trip(tmp_path: Path, storage: Storage, form: str) -> None:
    path = tmp_path / "a" / "b" / "x.bin"
    uri = str(path) if form == "plain" else f"file://{path}"
    data = os.urandom(1000)
    storage.write_bytes(uri, data)
    assert path.read_bytes() == data
    assert storage.read_bytes(uri) == data
    with storage.open_read(uri) as f:
        assert f.read() == data
    with storage.open_write(uri) as f:
        f.write(b"new")
    assert storage.read_bytes(uri) == b"new"
    assert storage.local_path(uri) == path


def test_relative_plain_path(tmp_path: Path, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("work/store/shards/a.tar", b"abc")
    assert (tmp_path / "work/store/shards/a.tar").read_bytes() == b"abc"
    assert storage.list("work/store") == ["work/store/shards/a.tar"]


def test_atomic_write_leaves_nothing_on_exception(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(str(target)) as f:
            f.write(b"partial data")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_atomic_write_keeps_old_content_on_exception(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(ValueError):
        with storage.open_write(str(target)) as f:
            f.write(b"new but broken")
            raise ValueError("fail")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_temp_file_invisible_while_writing(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "d" / "out.bin"
    with storage.open_write(str(target)) as f:
        f.write(b"x" * 10)
        assert not target.exists()
        assert storage.list(str(tmp_path)) == []  # the temp file is never listed
        assert any(TMP_MARKER in p.name for p in target.parent.iterdir())
    assert target.read_bytes() == b"x" * 10


def test_list_exists_delete(tmp_path: Path, storage: Storage) -> None:
    for name in ["s/train-000001.tar", "s/train-000000.tar", "s/val-000000.tar", "s/deep/z.txt", "other.txt"]:
        storage.write_bytes(str(tmp_path / name), name.encode())
    root = str(tmp_path)
    assert storage.list(join_uri(root, "s")) == [
        f"{root}/s/deep/z.txt",
        f"{root}/s/train-000000.tar",
        f"{root}/s/train-000001.tar",
        f"{root}/s/val-000000.tar",
    ]
    # a non-directory prefix matches by string prefix
    assert storage.list(join_uri(root, "s", "train-")) == [f"{root}/s/train-000000.tar", f"{root}/s/train-000001.tar"]
    # file:// prefixes give file:// URIs back
    assert storage.list(f"file://{root}/s/val") == [f"file://{root}/s/val-000000.tar"]
    assert storage.list(join_uri(root, "nothing-here")) == []
    assert storage.list(join_uri(root, "missing-dir", "x")) == []

    uri = f"{root}/s/val-000000.tar"
    assert storage.exists(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting a missing file is a no-op
    with pytest.raises(StorageError, match="directory"):
        storage.delete(f"{root}/s")


def test_missing_file_errors_name_the_uri(tmp_path: Path, storage: Storage) -> None:
    uri = str(tmp_path / "nope.bin")
    with pytest.raises(NotFoundError, match="nope.bin") as ei:
        storage.read_bytes(uri)
    assert ei.value.uri == uri
    with pytest.raises(NotFoundError, match="nope.bin"):
        storage.open_read(uri)
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))


def test_join_uri() -> None:
    assert join_uri("work/store", "shards", "a.tar") == "work/store/shards/a.tar"
    assert join_uri("work/store/", "shards/", "a.tar") == "work/store/shards/a.tar"
    assert join_uri("s3://b/p", "x") == "s3://b/p/x"
    assert join_uri("s3://b", "x", "y.tar") == "s3://b/x/y.tar"
    assert join_uri("s3://b/", "x") == "s3://b/x"
    assert join_uri("file:///abs", "x") == "file:///abs/x"
    assert join_uri("file:///", "x") == "file:///x"
    assert join_uri("/", "x") == "/x"
    assert join_uri("s3://b/p") == "s3://b/p"
    with pytest.raises(InvalidURIError, match=r"'\.\.'"):
        join_uri("s3://b/p", "../escape")
    with pytest.raises(InvalidURIError):
        join_uri("ftp://host/p", "x")


@pytest.mark.parametrize(
    ("uri", "msg"),
    [
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://Bad_Bucket/key", "invalid bucket"),
        ("gs://bucket/key", "unsupported URI scheme 'gs'"),
        ("http://host/x", "unsupported URI scheme 'http'"),
        ("file://remotehost/x", "names host"),
        ("file://", "no absolute path"),
        ("s3:bucket/key", "malformed"),
        ("", "empty"),
    ],
)
def test_bad_uris(uri: str, msg: str, storage: Storage) -> None:
    with pytest.raises(InvalidURIError, match=msg) as ei:
        storage.read_bytes(uri)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, StorageError)
    if uri:
        assert uri in str(ei.value)


def test_s3_uri_without_key_rejected_for_objects(storage: Storage) -> None:
    with pytest.raises(InvalidURIError, match="names no object key"):
        storage.read_bytes("s3://bucket")
    with pytest.raises(InvalidURIError, match="names no object key"):
        storage.write_bytes("s3://bucket/dir/", b"x")


def test_parse_uri() -> None:
    assert parse_uri("s3://bkt/a/b.tar").bucket == "bkt"
    assert parse_uri("s3://bkt/a/b.tar").key == "a/b.tar"
    assert parse_uri("file:///tmp/x%20y").path == Path("/tmp/x y")
    assert parse_uri("file://localhost/tmp/x").path == Path("/tmp/x")
    assert parse_uri("rel/path").kind == "file"
    assert Storage().local_path("s3://bkt/k") is None


def test_sha256_and_from_config() -> None:
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    s = from_config(StorageConfig(root="s3://b/p", retries=2, backoff_s=0.5))
    assert (s.retries, s.backoff_s) == (2, 0.5)
    with pytest.raises(ValueError):
        Storage(retries=-1)
    with pytest.raises(TypeError):
        Storage().write_bytes("/tmp/never-written", "text")  # type: ignore[arg-type]


def test_callers_oserror_propagates_unchanged(tmp_path: Path, storage: Storage) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(PermissionError, match="caller"):
        with storage.open_write(str(target)) as f:
            f.write(b"x")
            raise PermissionError("caller's own error")
    assert list(tmp_path.iterdir()) == []
