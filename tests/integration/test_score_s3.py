"""The score and bin stages against a real S3 API (a moto server on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pytest

from miroflow.config import Params
from miroflow.content_keys import stage_hash
from miroflow.data.hashing import data_hash
from miroflow.data.score_tables import load_score_table
from miroflow.prepare import run_prepare
from miroflow.rewards import clear_reward_cache
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage


def _params(tmp: Path, bucket: str) -> Params:
    return Params.model_validate(
        {
            "data": {
                "num_samples": 30,
                "shard_size": 10,
                "synthetic_captions": True,
                "manifest": str(tmp / "manifests" / "shards.json"),
            },
            "score": {
                "rewards": ["sharpness", "noise", "shapes_alignment"],
                "batch_size": 8,
                "device": "cpu",
                "num_bins": 8,
                "manifest": str(tmp / "manifests" / "scores.json"),
                "bins": str(tmp / "manifests" / "bins.json"),
            },
            "storage": {"root": f"s3://{bucket}/store", "retries": 2, "backoff_s": 0.05},
        }
    )


def test_score_and_bin_on_s3(tmp_path: Path, s3_bucket: str, moto_server: str) -> None:
    p = _params(tmp_path, s3_bucket)
    storage = Storage(retries=2, backoff_s=0.05)
    run_prepare(p, storage)
    clear_reward_cache()
    manifest = run_score(p, storage)

    folder = f"store/scores/{data_hash(p.data)}/{stage_hash(p, 'score')}"
    prefix = f"s3://{s3_bucket}/{folder}"
    assert [t["uri"] for t in manifest["tables"]] == [f"{prefix}/train-{i:06d}.parquet" for i in range(3)]
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="store/scores/")["Contents"])
    assert keys == sorted(
        [f"{folder}/train-{i:06d}.parquet" for i in range(3)]
        + [f"{folder}/train-{i:06d}.failures.jsonl" for i in range(3)]
        + [f"{folder}/train-{i:06d}.parquet.sha256" for i in range(3)]
        + [f"store/scores/{data_hash(p.data)}/reward_sets.json"]  # the dataset's reward-set registry
    )
    df = load_score_table(manifest["tables"][1]["uri"], storage)
    assert list(df["key"]) == [f"train-{i:08d}" for i in range(10, 20)]
    assert df.attrs["miroflow"]["shard"].startswith(f"s3://{s3_bucket}/store/shards/")
    assert {"shapes_alignment@synthetic", "shapes_alignment@synthetic.raw"} <= set(df.columns)
    assert "sharpness@synthetic" not in df.columns
    assert storage.read_bytes(manifest["tables"][1]["failures_uri"]) == b""

    modified = {k: s3.head_object(Bucket=s3_bucket, Key=k)["LastModified"] for k in keys}
    again = run_score(p, storage)
    assert again == manifest
    assert {k: s3.head_object(Bucket=s3_bucket, Key=k)["LastModified"] for k in keys} == modified

    binset = run_bin(p, storage)
    assert binset.names == ["sharpness", "noise", "shapes_alignment"]
    assert binset.rewards["sharpness"].n == 30
    n_syn = int(
        sum(
            np.isfinite(load_score_table(t["uri"], storage)["shapes_alignment"]).sum()
            + np.isfinite(load_score_table(t["uri"], storage)["shapes_alignment@synthetic"]).sum()
            for t in manifest["tables"]
        )
    )
    assert binset.rewards["shapes_alignment"].n == n_syn > 30
    copy = f"s3://{s3_bucket}/store/bins/bins-{binset.hash}.json"
    assert json.loads(storage.read_bytes(copy)) == json.loads(Path(p.score.bins).read_text())


def test_missing_bucket_is_a_clear_error(tmp_path: Path, s3_bucket: str) -> None:
    p = _params(tmp_path, s3_bucket)
    run_prepare(p)
    gone = p.model_copy(update={"storage": p.storage.model_copy(update={"root": "s3://no-such-bucket-xyz/store"})})
    from miroflow.storage import NoSuchBucketError

    with pytest.raises(NoSuchBucketError, match="no-such-bucket-xyz"):
        run_score(gone)
