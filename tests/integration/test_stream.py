"""The streaming data path on real shards, score tables and S3 (miroflow.data.stream)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from miroflow.conditioning import load_bins
from miroflow.config import Params
from miroflow.data.shards import read_manifest
from miroflow.data.stream import ShardLoader, StreamError, StreamSource
from miroflow.data.stream_plan import StreamPlan
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage
from tests.integration.test_storage_s3_resume import CuttingProxy

N, SHARD, B, P = 160, 10, 8, 4
REWARDS = ["sharpness", "noise"]


def _params(root: str, tmp: Path) -> Params:
    return Params.model_validate(
        {
            "storage": {"root": root, "retries": 3, "backoff_s": 0.01},
            "data": {
                "num_samples": N,
                "shard_size": SHARD,
                "synthetic_captions": True,
                "manifest": str(tmp / "m" / "shards.json"),
            },
            "score": {
                "rewards": REWARDS,
                "num_bins": 8,
                "manifest": str(tmp / "m" / "scores.json"),
                "bins": str(tmp / "m" / "bins.json"),
            },
        }
    )


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory) -> Params:
    tmp = tmp_path_factory.mktemp("stream")
    p = _params(str(tmp / "store"), tmp)
    run_prepare(p)
    run_score(p)
    run_bin(p)
    return p


def _source(p: Params, rank: int = 0, world: int = 1, workers: int = 0, storage: Storage | None = None) -> StreamSource:
    st = storage or Storage()
    shards = read_manifest(p.data.manifest)["shards"]
    plan = StreamPlan([s["n"] for s in shards], batch_size=B, seed=5, partitions=P, window=2)
    loader = ShardLoader.from_manifests(
        st, REWARDS, load_bins(p.score.bins), p.score.manifest, None, None, None, "pixel", p.data.resolution
    )
    return StreamSource(plan, [s["uri"] for s in shards], loader, rank, world, workers)


def _keys(src: StreamSource, steps: range) -> list[list[str]]:
    return [src.rows(s).keys for s in steps]


def test_two_ranks_read_exactly_the_rows_of_one(local_data: Params) -> None:
    one = _source(local_data)
    ranks = [_source(local_data, r, 2) for r in range(2)]
    for step in range(45):  # more than two epochs
        full = one.rows(step)
        parts = [r.rows(step) for r in ranks]
        assert full.keys == parts[0].keys + parts[1].keys
        assert torch.equal(full.images, torch.cat([q.images for q in parts]))  # type: ignore[arg-type]
        assert torch.equal(full.rewards.nan_to_num(-1), torch.cat([q.rewards for q in parts]).nan_to_num(-1))


def test_an_epoch_is_every_sample_once_and_the_next_is_reshuffled(local_data: Params) -> None:
    src = _source(local_data)
    per_epoch = N // B  # equal shards: every partition's epoch ends on the same step
    first = [k for ks in _keys(src, range(per_epoch)) for k in ks]
    second = [k for ks in _keys(src, range(per_epoch, 2 * per_epoch)) for k in ks]
    assert sorted(first) == sorted(second) == [f"train-{i:08d}" for i in range(N)]
    assert first != second


def test_resume_mid_epoch_and_loader_threads_give_the_same_sequence(local_data: Params) -> None:
    straight = _keys(_source(local_data), range(30))
    resumed = _keys(_source(local_data), range(13, 30))
    threaded = _source(local_data, workers=2)
    try:
        assert _keys(threaded, range(30)) == straight
    finally:
        threaded.close()
    assert resumed == straight[13:]


def test_rows_carry_bin_mapped_rewards_and_synthetic_captions(local_data: Params) -> None:
    d = _source(local_data).rows(3)
    assert d.images is not None and d.images.shape == (B, 32, 32, 3) and d.images.dtype == torch.uint8
    assert d.rewards.shape == (B, 2) and bool(((d.rewards >= 0) & (d.rewards <= 1)).all())
    assert d.syn_captions is not None and any(c for c in d.syn_captions)


def test_a_shard_shorter_than_its_manifest_is_named(local_data: Params, tmp_path: Path) -> None:
    man = read_manifest(local_data.data.manifest)
    man["shards"][2]["n"] = SHARD + 1
    bad = tmp_path / "shards.json"
    bad.write_text(json.dumps(man))
    p = local_data.model_copy(update={"data": local_data.data.model_copy(update={"manifest": str(bad)})})
    src = _source(p)
    with pytest.raises(
        StreamError, match=rf"shard {man['shards'][2]['uri']}: the manifest says 11 samples, it holds 10"
    ):
        for step in range(N // B):
            src.rows(step)


def test_streams_from_s3_through_a_connection_cut(
    tmp_path: Path, s3_bucket: str, moto_server: str, local_data: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _params(f"s3://{s3_bucket}/store", tmp_path)
    st = Storage(retries=3, backoff_s=0.01)
    run_prepare(p, st)
    run_score(p, st)
    run_bin(p, st)
    expected = _keys(_source(local_data), range(12))
    proxy = CuttingProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        proxy.arm(cut_after=20_000)  # a shard's GET dies mid-body; the reader resumes from its offset
        src = _source(p, storage=Storage(retries=3, backoff_s=0.01))
        assert _keys(src, range(12)) == expected
        assert proxy.cuts == 1
    finally:
        proxy.close()
