"""Fault: the S3 endpoint goes away mid-scoring and comes back (moto behind a loopback proxy).

Scoring writes, per shard, the failures file, then the table's hash record, then the table (the
commit point). The proxy cuts the connection at the start of a chosen ``PUT`` and refuses new
ones, so the cut lands between a shard's first and last write. Checked: a short outage is ridden
out by the retries; a long one ends the run with a one-line operational error (exit 1); no partial
table is ever visible; the rerun scores only what is missing; every sample ends up in exactly one
table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import yaml

from miroflow.config import Params
from miroflow.data.score_tables import check_score_table, load_score_table
from miroflow.prepare import run_prepare
from miroflow.storage import TMP_MARKER, Storage
from tests.faults.conftest import message_lines
from tests.faults.tcp_proxy import TcpProxy

N_SHARDS = 4
SHARD_SIZE = 10
PUTS_PER_SHARD = 3  # failures file, hash record, table
PROBE_PUTS = 1  # preflight's write-and-delete probe of storage.root
REGISTRY_PUTS = 1  # the dataset's reward-set registry, after the last shard


def _params_file(tmp: Path, bucket: str, retries: int, backoff_s: float) -> Path:
    doc = {
        "data": {"num_samples": N_SHARDS * SHARD_SIZE, "shard_size": SHARD_SIZE, "manifest": str(tmp / "shards.json")},
        "score": {
            "rewards": ["sharpness", "noise"],
            "batch_size": 8,
            "device": "cpu",
            "manifest": str(tmp / "scores.json"),
            "bins": str(tmp / "bins.json"),
        },
        "storage": {"root": f"s3://{bucket}/store", "retries": retries, "backoff_s": backoff_s},
        "tracking": {"enabled": False},
    }
    f = tmp / f"params-{retries}.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


@pytest.fixture
def proxy(moto_server: str) -> Iterator[TcpProxy]:
    p = TcpProxy(int(urlparse(moto_server).port or 0))
    yield p
    p.close()


def _score(params_file: Path, endpoint: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "MIROFLOW_DEBUG": ""}
    cmd = [sys.executable, "-m", "miroflow.cli", "score", "-p", str(params_file)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def _objects(bucket: str, endpoint: str) -> dict[str, str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = s3.list_objects_v2(Bucket=bucket, Prefix="store/scores/").get("Contents", [])
    return {o["Key"]: o["ETag"] for o in out}


def _assert_visible_tables_complete(bucket: str, endpoint: str) -> list[str]:
    """Every visible table passes its hash check and holds its whole shard; returns their keys."""
    keys = _objects(bucket, endpoint)
    assert not [k for k in keys if TMP_MARKER in k], keys
    tables = sorted(k for k in keys if k.endswith(".parquet"))
    for k in tables:
        uri = f"s3://{bucket}/{k}"
        assert k + ".sha256" in keys and k.replace(".parquet", ".failures.jsonl") in keys, k
        assert check_score_table(uri, Storage()).verified, uri
        assert len(load_score_table(uri)) == SHARD_SIZE, uri
    return tables


def _assert_every_sample_once(bucket: str, endpoint: str) -> None:
    tables = _assert_visible_tables_complete(bucket, endpoint)
    assert len(tables) == N_SHARDS
    keys = [k for t in tables for k in load_score_table(f"s3://{bucket}/{t}")["key"]]
    assert sorted(keys) == [f"train-{i:08d}" for i in range(N_SHARDS * SHARD_SIZE)]


def test_long_outage_fails_in_one_line_then_rerun_scores_only_the_rest(
    tmp_path: Path, s3_bucket: str, moto_server: str, proxy: TcpProxy
) -> None:
    params_file = _params_file(tmp_path, s3_bucket, retries=2, backoff_s=0.05)
    run_prepare(Params.model_validate(yaml.safe_load(params_file.read_text())))
    cut_at = PROBE_PUTS + PUTS_PER_SHARD + 1  # shard 0 committed, shard 1's failures file written, its hash record cut
    proxy.down_after_puts = cut_at

    failed = _score(params_file, proxy.endpoint, tmp_path)
    assert failed.returncode == 1, failed.stderr
    lines = message_lines(failed.stderr)
    assert 1 <= len(lines) <= 3 and "Traceback" not in failed.stderr, failed.stderr
    assert "connection failed" in failed.stderr and f"s3://{s3_bucket}/store/scores/" in failed.stderr
    assert proxy.outages == 1 and not proxy.is_up
    assert not (tmp_path / "scores.json").exists()
    committed = _assert_visible_tables_complete(s3_bucket, moto_server)
    assert len(committed) == 1  # shard 0 only; shard 1 never became visible
    before = _objects(s3_bucket, moto_server)

    proxy.come_back()
    proxy.puts = 0
    rerun = _score(params_file, proxy.endpoint, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert proxy.puts == PROBE_PUTS + PUTS_PER_SHARD * (N_SHARDS - 1) + REGISTRY_PUTS  # shard 0 not scored again
    after = _objects(s3_bucket, moto_server)
    assert {k: after[k] for k in before if k.startswith(committed[0].removesuffix(".parquet"))} == {
        k: v for k, v in before.items() if k.startswith(committed[0].removesuffix(".parquet"))
    }
    _assert_every_sample_once(s3_bucket, moto_server)
    assert (tmp_path / "scores.json").exists()


def test_short_outage_is_ridden_out_by_retries(
    tmp_path: Path, s3_bucket: str, moto_server: str, proxy: TcpProxy
) -> None:
    params_file = _params_file(tmp_path, s3_bucket, retries=6, backoff_s=0.2)  # retries span ~12 s
    run_prepare(Params.model_validate(yaml.safe_load(params_file.read_text())))
    proxy.down_after_puts = PROBE_PUTS + 2 * PUTS_PER_SHARD + 2  # shard 2's table (its commit point) cut
    proxy.down_for_s = 1.0

    done = _score(params_file, proxy.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr
    assert proxy.outages == 1
    assert "transient storage error" in done.stderr  # the retries are logged
    _assert_every_sample_once(s3_bucket, moto_server)
