"""A tiny MIRO model trained on shapes follows a reward target (slow: trains for ~300 steps on CPU).

The shapes data are half blurred, so "sharpness" is a strong, weight-free label. After training, the
same prompts and seeds are sampled with the sharpness target at 0 and at 1 (every other reward at
1, no guidance); the target-1 images must be measurably sharper, image by image and on average.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from miroflow.config import Params, apply_overrides
from miroflow.evaluate import generate, sample_seed, score_images
from miroflow.pipeline import load_pipeline
from miroflow.prepare import run_prepare
from miroflow.prompts import load_prompt_set
from miroflow.score import run_bin, run_score
from miroflow.sweep import run_sweep
from miroflow.train import run_train

pytestmark = pytest.mark.slow

REWARDS = ["sharpness", "contrast", "noise"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, str]:
    """Prepare 512 shapes samples, score and bin them, train a tiny MIRO model; returns (params, final URI)."""
    root = tmp_path_factory.mktemp("reward_target")
    ov = [
        f"storage.root={root}/store",
        "data.num_samples=512",
        "data.shard_size=256",
        f"data.manifest={root}/manifests/shards.json",
        f"score.manifest={root}/manifests/scores.json",
        f"score.bins={root}/manifests/bins.json",
        "score.num_bins=16",
        f"score.rewards={json.dumps(REWARDS)}",
        "score.device=cpu",
        "train.run_name=target",
        "train.model=tiny",
        "train.text_encoder=learned",
        "train.steps=300",
        "train.batch_size=32",
        "train.lr=2e-3",
        "train.warmup_steps=20",
        "train.ema_decay=0.99",
        "train.log_every=50",
        "train.eval_every=10000",
        "train.checkpoint_every=10000",
        "train.device=cpu",
        "train.seed=0",
        "tracking.enabled=false",
    ]
    params = apply_overrides(Params(), ov)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    out = run_train(params)
    return params, out.checkpoint


def test_sharpness_target_moves_sharpness(trained: tuple[Params, str]) -> None:
    params, ckpt = trained
    pipe = load_pipeline(ckpt, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.reward_names == REWARDS
    items = load_prompt_set("shapes:4")  # 24 prompts, every category
    prompts = [it.prompt for it in items for _ in range(2)]
    seeds = [sample_seed(0, i, j) for i in range(len(items)) for j in range(2)]
    means: dict[float, dict[str, float]] = {}
    values: dict[float, np.ndarray] = {}
    for target in (0.0, 1.0):
        imgs = generate(pipe, prompts, seeds, num_inference_steps=20, reward_targets={"sharpness": target})
        sc = score_images(imgs, prompts, REWARDS)
        values[target] = sc["sharpness"]
        means[target] = {k: float(np.mean(v)) for k, v in sc.items()}
    print(f"\nreward means with sharpness target 0: {means[0.0]}\nreward means with sharpness target 1: {means[1.0]}")
    wins = float(np.mean(values[1.0] > values[0.0]))
    print(f"fraction of (prompt, seed) pairs sharper at target 1: {wins:.2f}")
    assert means[1.0]["sharpness"] > means[0.0]["sharpness"] + 0.05, means
    assert wins >= 0.7, wins


def test_sweep_target_grid_on_the_trained_model(trained: tuple[Params, str], tmp_path: Path) -> None:
    params, ckpt = trained
    p = apply_overrides(
        params,
        [
            f"eval.checkpoint={ckpt}",
            "eval.prompt_set=shapes:2",
            "eval.images_per_prompt=2",
            "eval.steps=20",
            "sweep.guidance_scales=[0.0]",
            "sweep.target_reward=sharpness",
            "sweep.target_values=[0.0,0.5,1.0]",
            "sweep.best_of_n=[1,4]",
            "sweep.select_by=sharpness",
            f"eval.rewards={json.dumps(REWARDS)}",
        ],
    )
    doc = run_sweep(p, out_uri=str(tmp_path / "sweep"))
    target = [pt for pt in doc["points"] if pt["kind"] == "target"]
    sharp = [pt["rewards"]["sharpness"] for pt in target]
    print(f"\nsharpness by target {[pt['x'] for pt in target]}: {sharp}")
    assert sharp[-1] > sharp[0]
    bon = [pt["rewards"]["sharpness"] for pt in doc["points"] if pt["kind"] == "best_of_n"]
    assert bon[1] >= bon[0]
