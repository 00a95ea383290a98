"""Integrity end to end (CPU, real files): a resumed run falls back past damaged checkpoints and
does not prune the good ones; the score stage rescores damaged tables instead of trusting them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from miroflow.checkpoint import CheckpointError, checkpoint_uri, latest_checkpoint, list_checkpoints, run_uri
from miroflow.config import Params, apply_overrides
from miroflow.data.score_tables import ScoreError, load_score_table, table_hash_uri
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage
from miroflow.train import run_train


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a prepared, scored, binned 64-sample dataset (two shards)."""
    root = tmp_path_factory.mktemp("integrity")
    ov = [
        f"storage.root={root}/store",
        "data.num_samples=64",
        "data.shard_size=32",
        f"data.manifest={root}/manifests/shards.json",
        f"score.manifest={root}/manifests/scores.json",
        f"score.bins={root}/manifests/bins.json",
        "score.rewards=[sharpness,noise]",
        "score.num_bins=8",
    ]
    params = apply_overrides(Params(), ov)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return ov


def _train(data: list[str], run: str, *extra: str) -> Params:
    return apply_overrides(
        Params(),
        [
            *data,
            f"train.run_name={run}",
            "train.model=tiny",
            "train.steps=30",
            "train.batch_size=8",
            "train.warmup_steps=2",
            "train.log_every=1000",
            "train.eval_every=1000",
            "train.seed=3",
            *extra,
        ],
    )


def test_resume_falls_back_past_a_truncated_checkpoint_and_keeps_the_good_one(
    data_overrides: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage()
    params = _train(data_overrides, "fallback", "train.checkpoint_every=10", "train.keep_last=2")
    run_train(params, max_steps=20)
    run = run_uri(params)
    assert [s for s, _ in list_checkpoints(run, storage)] == [10, 20]
    ema = Path(checkpoint_uri(run, 20)) / "ema" / "model.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 3])  # the newest one is truncated

    # Resume with a checkpoint every 5 steps and keep_last=1: the first new checkpoint (15) lies
    # before the damaged 20, which must neither count nor crowd out 15.
    resumed = _train(data_overrides, "fallback", "train.checkpoint_every=5", "train.keep_last=1")
    with caplog.at_level(logging.WARNING, logger="miroflow.checkpoint"):
        out = run_train(resumed, resume=True, max_steps=15)
    assert out.steps == 15 and len(out.losses) == 5  # resumed from step 10, not 20, not 0
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1, skipped
    assert f"skipping checkpoint {checkpoint_uri(run, 20)}" in skipped[0] and "ema/model.safetensors" in skipped[0]
    assert [s for s, _ in list_checkpoints(run, storage)] == [15, 20]
    assert latest_checkpoint(run, storage, verify=True) == checkpoint_uri(run, 15)

    # All the way: 20 is rewritten (good again) when training reaches it.
    final = run_train(resumed, resume=True)
    assert final.steps == 30 and len(final.losses) == 15
    assert latest_checkpoint(run, storage, verify=True) == checkpoint_uri(run, 30)


def test_resume_with_no_usable_checkpoint_names_the_run(data_overrides: list[str]) -> None:
    params = _train(data_overrides, "allbad", "train.checkpoint_every=2", "train.keep_last=5")
    run_train(params, max_steps=4)
    run = run_uri(params)
    for _, uri in list_checkpoints(run, Storage()):
        (Path(uri) / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"run {run}: none of its 2 complete checkpoint"):
        run_train(params, resume=True)


def test_damaged_score_table_is_rescored_on_resume(
    tmp_path: Path, data_overrides: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    params = apply_overrides(
        Params(),
        [
            *data_overrides,
            f"score.manifest={tmp_path}/scores.json",
            f"storage.root={tmp_path}/store2",  # fresh tables, same shards
        ],
    )
    first = run_score(params)
    t0, t1 = (Path(t["uri"]) for t in first["tables"])
    good0, good1 = t0.read_bytes(), t1.read_bytes()
    assert Path(table_hash_uri(str(t0))).read_text().endswith(f"  {t0.name}\n")

    flipped = bytearray(good0)
    flipped[10] ^= 0x40  # in the first data page: the footer (metadata) still reads fine
    t0.write_bytes(bytes(flipped))
    t1.write_bytes(good1[: len(good1) // 2])  # truncated
    with pytest.raises(ScoreError, match="does not match its hash record"):
        load_score_table(str(t0))
    mtime_before = {t: os.stat(t).st_mtime_ns for t in (t0, t1)}

    with caplog.at_level(logging.WARNING, logger="miroflow.score_engine"):
        again = run_score(params)
    assert again == first
    assert t0.read_bytes() == good0 and t1.read_bytes() == good1  # rescored, deterministically
    assert all(os.stat(t).st_mtime_ns != mtime_before[t] for t in (t0, t1))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(t0) in w and "does not match" in w and "rescoring" in w for w in warned), warned
    assert any(str(t1) in w and "rescoring" in w for w in warned), warned

    # Intact tables are skipped (untouched); so is one written before hash records existed.
    Path(table_hash_uri(str(t0))).unlink()
    mtimes = {t: os.stat(t).st_mtime_ns for t in (t0, t1)}
    resumed = run_score(params)
    # the table without a record is trusted, but the manifest no longer vouches for its bytes
    assert [t["sha256"] is None for t in resumed["tables"]] == [True, False]
    strip = [{k: v for k, v in t.items() if k != "sha256"} for t in first["tables"]]
    assert [{k: v for k, v in t.items() if k != "sha256"} for t in resumed["tables"]] == strip
    assert {t: os.stat(t).st_mtime_ns for t in (t0, t1)} == mtimes
