"""Training end to end on a tiny shapes dataset (CPU): loss falls, exact resume after SIGKILL,
torchrun DDP equals one process, architecture checks, baseline vs MIRO, bad reward names."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miroflow.checkpoint import ArchitectureMismatch, latest_checkpoint, list_checkpoints, resume_latest, run_uri
from miroflow.config import Params, apply_overrides
from miroflow.models import count_params
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage
from miroflow.train import run_train

WORKER = Path(__file__).with_name("ddp_worker.py")
VENV_BIN = Path(sys.executable).parent


class RecordingTracker:
    """A real in-memory tracker implementing the ``Tracker`` protocol."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[str, int, np.ndarray]] = []
        self.dicts: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, str] = {}
        self.checkpoints: list[tuple[str, int]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self.images.append((key, step, image))

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        self.dicts[artifact_file] = d

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_checkpoint(self, uri: str, step: int) -> None:
        self.checkpoints.append((uri, step))


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a prepared, scored, binned 256-sample dataset with synthetic captions."""
    root = tmp_path_factory.mktemp("train")
    ov = [
        f"storage.root={root}/store",
        "data.num_samples=256",
        "data.shard_size=128",
        "data.synthetic_captions=true",
        f"data.manifest={root}/manifests/shards.json",
        f"score.manifest={root}/manifests/scores.json",
        f"score.bins={root}/manifests/bins.json",
        "score.num_bins=16",
    ]
    params = apply_overrides(Params(), ov)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return ov


def train_overrides(data: list[str], run: str, *extra: str) -> list[str]:
    """Tiny-model training overrides on top of the dataset's."""
    return [
        *data,
        f"train.run_name={run}",
        "train.model=tiny",
        "train.steps=30",
        "train.batch_size=16",
        "train.warmup_steps=5",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.sample_steps=2",
        "train.checkpoint_every=10",
        "train.synthetic_caption_prob=0.5",
        "train.text_dropout=0.1",
        "train.seed=1",
        *extra,
    ]


def test_loss_falls_and_metrics_are_logged(data_overrides: list[str]) -> None:
    params = apply_overrides(Params(), train_overrides(data_overrides, "falls", "train.steps=60", "train.lr=2e-3"))
    tracker = RecordingTracker()
    out = run_train(params, tracker=tracker)
    losses = out.losses
    assert out.steps == 60 and len(losses) == 60 and all(math.isfinite(v) for v in losses)
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert last < 0.8 * first, (first, last)
    assert (
        out.checkpoint == f"{run_uri(params)}/final"
        and "/runs/falls-" in out.checkpoint
        and Path(out.checkpoint, "miro.json").is_file()
    )
    step1 = dict(tracker.metrics)[1]
    assert {"loss", "lr", "grad_norm", "img_per_s", "train/ema_decay"} <= set(step1)
    # The EMA decay each step applied (train.ema_warmup: min(ema_decay, (1+t)/(10+t)), 0 at the first).
    decays = [m["train/ema_decay"] for _, m in tracker.metrics if "train/ema_decay" in m]
    assert decays[:3] == [0.0, 2 / 11, 3 / 12] and out.ema_decay == decays[-1] == 60 / 69
    assert any(k.startswith("loss/t_bin_") for k in step1)
    assert step1["loss"] == pytest.approx(losses[0])
    assert [(key, step) for key, step, _ in tracker.images] == [("samples", 0), ("samples", 60)]  # from step 0
    grid = tracker.images[-1][2]  # 4 samples upscaled 4x (nearest) side by side, captions under them
    assert grid.dtype == np.uint8 and grid.shape[1] == 4 * (128 + 4) + 4 and grid.shape[0] > 128 + 8
    rewards = {k for _, m in tracker.metrics for k in m if k.startswith("reward/")}
    assert rewards == {f"reward/{n}" for n in params.score.rewards}
    assert [s for s, _ in list_checkpoints(run_uri(params), Storage())] == [50, 60]  # keep_last=2
    assert tracker.tags["kind"] == "miro" and tracker.params["train"]["steps"] == 60


def _ema(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "ema" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(data_overrides: list[str], tmp_path: Path) -> None:
    storage = Storage()
    ov = train_overrides(data_overrides, "killed", "train.steps=40", "train.checkpoint_every=5")
    params = apply_overrides(Params(), ov)
    (tmp_path / "ov.json").write_text(json.dumps(ov))
    threshold = random.choice([5, 10, 15, 20])
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "ov.json"), str(tmp_path / "out.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 400
        while True:
            done = list_checkpoints(run_uri(params), storage)
            if done and done[-1][0] >= threshold:
                break
            assert proc.poll() is None, "training subprocess exited before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(run_uri(params), storage)[-1][0]
    assert killed_at < 40
    resumed = run_train(params, resume=True)
    assert resumed.steps == 40 and len(resumed.losses) == 40 - killed_at
    reference = run_train(
        apply_overrides(
            Params(), train_overrides(data_overrides, "uninterrupted", "train.steps=40", "train.checkpoint_every=5")
        )
    )
    a, b = _ema(resumed.checkpoint), _ema(reference.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.losses == reference.losses[killed_at:]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(data_overrides: list[str], tmp_path: Path) -> None:
    ov = train_overrides(data_overrides, "ddp", "train.checkpoint_every=100")
    (tmp_path / "ov.json").write_text(json.dumps(ov))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path / "ov.json"),
        str(tmp_path / "out.json"),
        "10",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-4000:]
    ddp = json.loads((tmp_path / "out.json").read_text())
    single = run_train(
        apply_overrides(Params(), train_overrides(data_overrides, "single", "train.checkpoint_every=100")), max_steps=10
    )
    assert len(ddp["losses"]) == len(single.losses) == 10
    np.testing.assert_allclose(ddp["losses"], single.losses, atol=1e-4, rtol=0)


def test_resume_with_other_architecture_fails_naming_keys(data_overrides: list[str]) -> None:
    ov = train_overrides(data_overrides, "arch", "train.steps=2", "train.checkpoint_every=1")
    first = apply_overrides(Params(), ov)
    run_train(first)
    other = apply_overrides(Params(), [*ov, "train.model=small", "train.rewards=[sharpness]"])
    assert run_uri(other) != run_uri(first)  # other params: another folder, the first run untouched
    with pytest.raises(ArchitectureMismatch) as err:  # its checkpoint resumed with them: refused
        resume_latest(run_uri(first), other, ["sharpness"])
    msg = str(err.value)
    assert (
        "num_layers (checkpoint 3, params 4)" in msg
        and "reward_names (checkpoint [" in msg
        and "params ['sharpness'])" in msg
    )


def test_baseline_and_miro_differ_by_one_param(data_overrides: list[str]) -> None:
    from miroflow.checkpoint import load_model

    miro = run_train(apply_overrides(Params(), train_overrides(data_overrides, "miro3", "train.steps=3")))
    base = run_train(
        apply_overrides(Params(), train_overrides(data_overrides, "base3", "train.steps=3", "train.rewards=[]"))
    )
    m_model, m_spec = load_model(miro.checkpoint)
    b_model, b_spec = load_model(base.checkpoint)
    assert (
        m_spec["reward_names"] == ["sharpness", "noise", "contrast", "compressibility", "shapes_alignment"]
        and b_spec["reward_names"] == []
    )
    assert b_spec["bins"] is None and m_spec["bins"]["num_bins"] == 16
    assert count_params(m_model) - count_params(b_model) == count_params(m_model.reward_embedder) > 0
    assert all(math.isfinite(v) for v in miro.losses + base.losses)
    # Zero-initialised reward path: at step 0 both models compute the same function on the same draws.
    assert miro.losses[0] == pytest.approx(base.losses[0], abs=1e-6)
    assert miro.losses[-1] < miro.losses[0] and base.losses[-1] < base.losses[0]


def test_unknown_reward_is_named(data_overrides: list[str]) -> None:
    params = apply_overrides(Params(), train_overrides(data_overrides, "bad", "train.rewards=[sharpness,aesthetic_v9]"))
    with pytest.raises(ValueError, match=r"train\.rewards: \['aesthetic_v9'\] not in the bins"):
        run_train(params)
    assert latest_checkpoint(run_uri(params), Storage()) is None
