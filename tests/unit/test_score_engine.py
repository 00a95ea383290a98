"""Tests for miroflow.score: the scoring engine, idempotence, crash-safety and the bin stage (local FS)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from miroflow.conditioning import load_bins
from miroflow.config import Params
from miroflow.content_keys import stage_hash
from miroflow.data.hashing import data_hash
from miroflow.data.score_tables import ScoreError, failures_uri, load_score_table, read_table_meta
from miroflow.data.shards import decode_image, iter_shard, read_manifest
from miroflow.prepare import run_prepare
from miroflow.rewards import RewardNotFound, clear_reward_cache, load_rewards, register_reward
from miroflow.score import run_bin, run_score, score_table_uri
from miroflow.score_engine import score_shard
from miroflow.storage import Storage

SUFFIX = uuid.uuid4().hex[:8]
BRIGHT = f"test_brightness_{SUFFIX}"
CAPLEN = f"test_caption_len_{SUFFIX}"
BOOM = f"test_boom_{SUFFIX}"
DEVICE_ONLY = f"test_device_only_{SUFFIX}"


class CountingBrightness:
    """Image-only reward: mean intensity ``[B]``; counts constructions, calls and batch tensors."""

    name = BRIGHT
    version = "bright-v1"
    uses_prompt = False
    built: ClassVar[int] = 0
    calls: ClassVar[list[tuple[int, int]]] = []  # (id(images), B) per call

    def __init__(self) -> None:
        type(self).built += 1

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Mean over ``[3, H, W]`` of ``images [B, 3, H, W]``."""
        type(self).calls.append((id(images), images.shape[0]))
        return images.mean(dim=(1, 2, 3)).float()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Identity (already in [0, 1])."""
        return raw.float()


class CountingCaptionLength:
    """Prompt-dependent reward: ``len(prompt)`` characters ``[B]``; normalize = raw / 100."""

    name = CAPLEN
    version = "caplen-v1"
    uses_prompt = True
    built: ClassVar[int] = 0
    calls: ClassVar[list[tuple[int, list[str]]]] = []

    def __init__(self) -> None:
        type(self).built += 1

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Prompt lengths ``[B]``."""
        assert images.shape[0] == len(prompts)
        type(self).calls.append((id(images), list(prompts)))
        return torch.tensor([float(len(p)) for p in prompts])

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw / 100``."""
        return raw.float() / 100.0


class Boom:
    """A reward that raises on every batch (a real error the engine must not swallow)."""

    name = BOOM
    version = "boom-v1"
    uses_prompt = False

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Always raises."""
        raise RuntimeError("kaboom")

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return raw


@register_reward(BRIGHT, needs_weights=False, version="bright-v1")
def _make_bright(**kwargs: Any) -> CountingBrightness:
    return CountingBrightness()


@register_reward(CAPLEN, needs_weights=False, version="caplen-v1")
def _make_caplen(**kwargs: Any) -> CountingCaptionLength:
    return CountingCaptionLength()


@register_reward(BOOM, needs_weights=False, version="boom-v1")
def _make_boom(**kwargs: Any) -> Boom:
    return Boom()


DEVICE_SEEN: list[str] = []


@register_reward(DEVICE_ONLY, needs_weights=False)
def _make_device_only(device: str = "cpu") -> CountingBrightness:
    DEVICE_SEEN.append(device)
    return CountingBrightness()


@pytest.fixture(autouse=True)
def _reset_counters() -> None:
    clear_reward_cache()
    for cls in (CountingBrightness, CountingCaptionLength):
        cls.built = 0
        cls.calls = []


def make_params(
    tmp: Path, rewards: list[str], n: int = 24, shard_size: int = 8, synthetic: bool = True, batch_size: int = 5
) -> Params:
    """Params for a tiny shapes dataset under ``tmp`` (manifests and store there too)."""
    return Params.model_validate(
        {
            "data": {
                "num_samples": n,
                "shard_size": shard_size,
                "synthetic_captions": synthetic,
                "manifest": str(tmp / "manifests" / "shards.json"),
            },
            "score": {
                "rewards": rewards,
                "batch_size": batch_size,
                "device": "cpu",
                "manifest": str(tmp / "manifests" / "scores.json"),
                "bins": str(tmp / "manifests" / "bins.json"),
            },
            "storage": {"root": str(tmp / "store")},
        }
    )


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------ engine


def test_engine_values_columns_metadata_and_decode_once(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT, CAPLEN, "sharpness"])
    man = run_prepare(p)
    storage = Storage()
    shard = man["shards"][0]
    out = score_table_uri(p, shard["uri"])
    assert out == str(
        tmp_path / "store" / "scores" / data_hash(p.data) / stage_hash(p, "score") / "train-000000.parquet"
    )

    res = score_shard(
        shard["uri"], load_rewards(p.score), out, storage, batch_size=5, progress=False, expected_sha256=shard["sha256"]
    )
    assert res == {
        "shard": shard["uri"],
        "uri": out,
        "n": 8,
        "failures": 0,
        "failures_uri": failures_uri(out),
        "sha256": hashlib.sha256(Path(out).read_bytes()).hexdigest(),
        "skipped": False,
    }
    df = load_score_table(out, storage)
    assert list(df.columns) == [
        "key",
        f"{BRIGHT}.raw",
        BRIGHT,
        f"{CAPLEN}.raw",
        CAPLEN,
        f"{CAPLEN}@synthetic.raw",
        f"{CAPLEN}@synthetic",
        "sharpness.raw",
        "sharpness",
    ]  # no @synthetic columns for image-only rewards
    meta = df.attrs["miroflow"]
    assert meta["rewards"] == {BRIGHT: "bright-v1", CAPLEN: "caplen-v1", "sharpness": "sharpness-v1"}
    assert meta["shard"] == shard["uri"] and meta["shard_sha256"] == shard["sha256"] and meta["n"] == 8

    # Hand computation from the shard itself.
    recs = {r["key"]: r for r in iter_shard(shard["uri"], storage)}
    assert list(df["key"]) == list(recs)
    for _, row in df.iterrows():
        rec = recs[row["key"]]
        img = decode_image(rec["image_bytes"]).astype(np.float64) / 255.0
        assert row[f"{BRIGHT}.raw"] == pytest.approx(img.mean(), abs=1e-6)
        assert row[f"{CAPLEN}.raw"] == len(rec["txt"])
        assert row[CAPLEN] == pytest.approx(len(rec["txt"]) / 100.0)
        assert row[f"{CAPLEN}@synthetic.raw"] == len(rec["json"]["captions"]["synthetic"])
        assert 0.0 <= row["sharpness"] <= 1.0

    # Image-only reward: once per batch (8 samples / batch 5 -> 2 calls), not once per caption.
    assert [b for _, b in CountingBrightness.calls] == [5, 3]
    # Prompt reward: original + synthetic per batch; every reward saw the same decoded tensor.
    assert len(CountingCaptionLength.calls) == 4
    ids_bright = [i for i, _ in CountingBrightness.calls]
    ids_cap = [i for i, _ in CountingCaptionLength.calls]
    assert ids_cap == [ids_bright[0], ids_bright[0], ids_bright[1], ids_bright[1]]


def test_no_synthetic_captions_no_synthetic_columns(tmp_path: Path) -> None:
    p = make_params(tmp_path, [CAPLEN], n=6, shard_size=6, synthetic=False)
    shard = run_prepare(p)["shards"][0]
    out = score_table_uri(p, shard["uri"])
    score_shard(shard["uri"], load_rewards(p.score), out, Storage(), batch_size=5, progress=False)
    assert list(load_score_table(out).columns) == ["key", f"{CAPLEN}.raw", CAPLEN]
    assert len(CountingCaptionLength.calls) == 2  # batch 5 -> 2 calls, original caption only


def test_bad_samples_go_to_failures_and_never_crash(tmp_path: Path) -> None:
    good = np.full((8, 8, 3), 200, dtype=np.uint8)
    shard = tmp_path / "raw" / "odd-000000.tar"
    shard.parent.mkdir()
    _write_tar(
        shard,
        [
            ("s-ok.png", _png(good)),
            ("s-ok.txt", b"a red circle"),
            ("s-corrupt.png", b"\x89PNG not really"),
            ("s-corrupt.txt", b"a blue square"),
            ("s-empty.png", _png(good)),
            ("s-empty.txt", b"   "),
            ("s-nocap.png", _png(good)),
            ("s-syn.png", _png(good)),
            ("s-syn.txt", b"two circles"),
            ("s-syn.json", json.dumps({"captions": {"original": "two circles", "synthetic": ""}}).encode()),
            ("s-pkl.png", _png(good)),
            ("s-pkl.txt", b"x"),
            ("s-pkl.pyd", b"\x80\x04."),
        ],
    )
    p = make_params(tmp_path, [BRIGHT, CAPLEN])
    out = score_table_uri(p, str(shard))
    assert out == str(tmp_path / "store" / "scores" / "raw" / stage_hash(p, "score") / "odd-000000.parquet")
    res = score_shard(str(shard), load_rewards(p.score), out, Storage(), progress=False)
    df = load_score_table(out)
    assert list(df["key"]) == ["s-ok", "s-syn"]
    assert res["n"] == 2 and res["failures"] == 5
    syn = df.set_index("key")
    assert np.isnan(syn.loc["s-syn", f"{CAPLEN}@synthetic"]) and np.isnan(syn.loc["s-ok", f"{CAPLEN}@synthetic.raw"])
    assert syn.loc["s-syn", CAPLEN] == pytest.approx(len("two circles") / 100)
    fails = {f["key"]: f for f in map(json.loads, Path(failures_uri(out)).read_text().splitlines())}
    assert set(fails) == {"s-corrupt", "s-empty", "s-nocap", "s-syn", "s-pkl"}
    assert "cannot decode" in fails["s-corrupt"]["reason"] and "s-corrupt" in fails["s-corrupt"]["reason"]
    assert "caption" in fails["s-empty"]["reason"] and "caption" in fails["s-nocap"]["reason"]
    assert "pickle" in fails["s-pkl"]["reason"]
    assert fails["s-syn"]["scope"] == "synthetic" and fails["s-corrupt"]["scope"] == "sample"


def test_reward_error_is_raised_naming_reward_and_shard(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT, BOOM], n=4, shard_size=4)
    shard = run_prepare(p)["shards"][0]["uri"]
    out = score_table_uri(p, shard)
    with pytest.raises(ScoreError, match=rf"reward '{BOOM}' on shard .*train-000000\.tar .*kaboom"):
        score_shard(shard, load_rewards(p.score), out, Storage(), progress=False)
    assert not Path(out).exists()


def test_wrong_shard_bytes_are_an_error(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT], n=4, shard_size=4)
    shard = run_prepare(p)["shards"][0]["uri"]
    with pytest.raises(ScoreError, match="does not match the manifest"):
        score_shard(
            shard, load_rewards(p.score), score_table_uri(p, shard), Storage(), progress=False, expected_sha256="0" * 64
        )


# ------------------------------------------------------------------------------------------ rewards


def test_load_rewards_is_lazy_and_validates_names(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT, "sharpness"])
    rewards = load_rewards(p.score)
    assert [r.name for r in rewards] == [BRIGHT, "sharpness"]
    assert [r.version for r in rewards] == ["bright-v1", "sharpness-v1"]
    assert CountingBrightness.built == 0  # version read from the class, nothing built
    with pytest.raises(RewardNotFound, match=r"unknown reward 'nope'.*valid rewards: .*sharpness"):
        load_rewards(p.score.model_copy(update={"rewards": ["sharpness", "nope"]}))
    with pytest.raises(ValueError, match="duplicate"):
        load_rewards(p.score.model_copy(update={"rewards": ["sharpness", "sharpness"]}))


def test_load_rewards_passes_only_accepted_kwargs(tmp_path: Path) -> None:
    p = make_params(tmp_path, [DEVICE_ONLY])
    DEVICE_SEEN.clear()
    (r,) = load_rewards(p.score)
    r.score(torch.zeros(1, 3, 4, 4), ["x"])
    assert DEVICE_SEEN == ["cpu"]
    cfg = p.score.model_copy(update={"reward_weights": {DEVICE_ONLY: "/some/weights.bin"}})
    with pytest.raises(ValueError, match=rf"score.reward_weights.{DEVICE_ONLY}: .*takes no weights"):
        load_rewards(cfg)


# ------------------------------------------------------------------------------------------ stages


def test_run_score_rerun_makes_no_reward_calls_and_rescoring_on_change(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT, CAPLEN])
    run_prepare(p)
    m1 = run_score(p)
    assert m1["rewards"] == {BRIGHT: "bright-v1", CAPLEN: "caplen-v1"}
    assert [t["n"] for t in m1["tables"]] == [8, 8, 8] and m1["num_rows"] == 24
    assert CountingBrightness.calls and CountingBrightness.built == 1
    mtimes = {t["uri"]: os.stat(t["uri"]).st_mtime_ns for t in m1["tables"]}

    clear_reward_cache()
    CountingBrightness.built, CountingBrightness.calls = 0, []
    CountingCaptionLength.built, CountingCaptionLength.calls = 0, []
    m2 = run_score(p)
    assert m2 == m1
    assert CountingBrightness.calls == [] and CountingCaptionLength.calls == []
    assert CountingBrightness.built == 0 and CountingCaptionLength.built == 0  # not even built
    assert {t["uri"]: os.stat(t["uri"]).st_mtime_ns for t in m2["tables"]} == mtimes

    # A subset of the rewards: its tables are assembled from the existing ones, no reward call
    # (tests/unit/test_incremental_scores.py covers adding rewards and new versions).
    p3 = p.model_copy(update={"score": p.score.model_copy(update={"rewards": [BRIGHT]})})
    m3 = run_score(p3)
    assert m3["rewards"] == {BRIGHT: "bright-v1"} and CountingBrightness.calls == []
    assert read_table_meta(m3["tables"][0]["uri"], Storage())["rewards"] == {BRIGHT: "bright-v1"}


def test_run_bin_pools_synthetic_and_saves_both_copies(tmp_path: Path) -> None:
    p = make_params(tmp_path, ["sharpness", CAPLEN], n=40, shard_size=20)
    p = p.model_copy(update={"score": p.score.model_copy(update={"num_bins": 8})})
    run_prepare(p)
    run_score(p)
    binset = run_bin(p)
    assert binset.names == ["sharpness", CAPLEN]
    assert binset.rewards["sharpness"].n == 40 and binset.rewards[CAPLEN].n == 80  # original + synthetic
    assert binset.rewards[CAPLEN].version == "caplen-v1"
    tables = [load_score_table(t["uri"]) for t in json.loads(Path(p.score.manifest).read_text())["tables"]]
    pooled = np.concatenate(
        [np.concatenate([t[CAPLEN].to_numpy(), t[f"{CAPLEN}@synthetic"].to_numpy()]) for t in tables]
    )
    np.testing.assert_allclose(binset.rewards[CAPLEN].edges, np.quantile(pooled, np.linspace(0, 1, 9)))
    assert load_bins(p.score.bins).to_json() == binset.to_json()
    copy = Path(p.storage.root) / "bins" / f"bins-{binset.hash}.json"
    assert json.loads(copy.read_text()) == binset.to_json()

    stale = p.model_copy(update={"score": p.score.model_copy(update={"rewards": ["sharpness"]})})
    with pytest.raises(ScoreError, match="rerun the score stage"):
        run_bin(stale)


# ------------------------------------------------------------------------------------------ crash safety

KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from miroflow.config import Params
    from miroflow.rewards import register_reward
    from miroflow.score import run_score

    class SlowMean:
        '''Image-only reward: mean intensity [B], 0.15 s per batch (so the run can be killed mid-way).'''
        name = "slow_mean"
        version = "slow-v1"
        uses_prompt = False
        def score(self, images, prompts):
            time.sleep(0.15)
            return images.mean(dim=(1, 2, 3))
        def normalize(self, raw):
            return raw

    @register_reward("slow_mean", needs_weights=False)
    def _make(**kw) -> SlowMean:
        return SlowMean()

    run_score(Params.model_validate_json(open(sys.argv[1]).read()))
    """
)


def test_sigkill_mid_run_then_rerun_scores_every_sample_once(tmp_path: Path) -> None:
    p = make_params(tmp_path, ["slow_mean", "sharpness"], n=48, shard_size=8, synthetic=False, batch_size=4)
    man = run_prepare(p)
    params_json = tmp_path / "params.json"
    params_json.write_text(p.model_dump_json())
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(params_json)]
    tables = [score_table_uri(p, s["uri"]) for s in man["shards"]]

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(Path(t).exists() for t in tables):
        assert proc.poll() is None, f"scorer exited early: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no table appeared within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    done = [t for t in tables if Path(t).exists()]
    assert 1 <= len(done) < len(tables), "the kill did not land mid-run"
    for t in done:  # whatever is visible is complete
        assert len(load_score_table(t)) == 8
    assert not Path(p.score.manifest).exists()
    first = done[0]
    before = (os.stat(first).st_mtime_ns, hashlib.sha256(Path(first).read_bytes()).hexdigest())

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (os.stat(first).st_mtime_ns, hashlib.sha256(Path(first).read_bytes()).hexdigest()) == before
    keys: list[str] = []
    for t in tables:
        keys.extend(load_score_table(t)["key"])
    expected = [f"train-{i:08d}" for i in range(48)]
    assert sorted(keys) == expected and len(keys) == len(set(keys))
    listed = Storage().list(str(Path(p.storage.root) / "scores"))  # temp files of the killed run never show
    assert sorted(u for u in listed if u.endswith(".parquet")) == sorted(tables)
    assert all(".miroflow-tmp-" not in u for u in listed)
    assert read_manifest(p.data.manifest)["num_samples"] == json.loads(Path(p.score.manifest).read_text())["num_rows"]


def test_truncated_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    p = make_params(tmp_path, [BRIGHT], n=8, shard_size=8)
    shard = Path(run_prepare(p)["shards"][0]["uri"])
    bad = tmp_path / "cut" / "train-000000.tar"
    bad.parent.mkdir()
    bad.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    from miroflow.data.shards import ShardError

    with pytest.raises(ShardError, match=r"cut/train-000000\.tar"):
        score_shard(str(bad), load_rewards(p.score), score_table_uri(p, str(bad)), Storage(), progress=False)
    assert not Path(score_table_uri(p, str(bad))).exists()
