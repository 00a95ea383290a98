"""S3 keys never become local paths outside their target folder (moto server on loopback).

A checkpoint prefix holding a key such as ``ck/final//tmp/x`` or ``ck/final/ema/../../x`` must be
refused by every download path (checkpoint loading, pipeline loading, model registration) before a
single file is written, with an error naming the offending URI.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from miroflow.checkpoint import local_checkpoint
from miroflow.pipeline import load_pipeline
from miroflow.storage import Storage, UnsafeKeyError, local_target
from miroflow.tracking.registry import _copy_checkpoint


@pytest.mark.parametrize(
    "rel",
    ["", "/etc/passwd", "a//b", "a/./b", "../x", "ema/../../x", "a/..", "a\\b", "a\x00b", "./a"],
)
def test_local_target_refuses_unsafe_suffixes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafeKeyError, match="s3://b/k"):
        local_target(tmp_path, rel, "s3://b/k")


def test_local_target_refuses_a_symlink_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(UnsafeKeyError, match="resolves outside"):
        local_target(root, "link/x.json", "s3://b/k")
    assert local_target(root, "ema/model.safetensors", "s3://b/k") == (root / "ema/model.safetensors").resolve()


@pytest.mark.parametrize("evil", ["ck/final//tmp/miroflow-escape.json", "ck/final/ema/../../escape.json"])
def test_every_download_path_refuses_an_escaping_key(s3_bucket: str, moto_server: str, evil: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="ck/final/miro.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="ck/final/ema/model.safetensors", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key=evil, Body=b"{}")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert evil in keys  # the server kept the hostile key as written
    uri = f"s3://{s3_bucket}/ck/final"
    storage = Storage()
    # where each key lands if joined unchecked onto a temporary directory under /tmp
    escapes = [Path("/tmp/miroflow-escape.json"), Path("/tmp/escape.json")]
    for e in escapes:
        e.unlink(missing_ok=True)

    with pytest.raises(UnsafeKeyError, match=s3_bucket), local_checkpoint(uri, storage):
        pass
    with pytest.raises(UnsafeKeyError, match=s3_bucket):
        load_pipeline(uri, storage=storage)
    with pytest.raises(UnsafeKeyError, match=s3_bucket):
        _copy_checkpoint(uri, Path("/tmp") / f"miroflow-reg-{s3_bucket}")
    assert not [e for e in escapes if e.exists()]
    assert not (Path("/tmp") / f"miroflow-reg-{s3_bucket}" / "miro.json").exists()  # nothing written at all
