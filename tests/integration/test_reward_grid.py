"""Off-grid reward targets on a trained tiny MIRO model (slow: trains ~300 steps on CPU).

Training only shows conditioning values on the ``k/G`` grid (``G = score.num_bins - 1``). With the
``grid_interp`` reward embedding a target between two grid values must behave like something between
them (docs/fidelity.md, "Reward embedding"): the sharpness target is swept over the study's targets
0.25, 0.5 and 0.75, which are off the G = 15 grid, and over their two grid neighbours, on the same
prompts and seeds, with every other reward at 1 and no guidance (ω = 0). Each off-grid mean must
lie between its neighbours' means within 2 standard errors (of the paired per-image differences,
see :func:`between`).

The same weights read with the original ``fourier`` embedding give the same images on the grid and,
as an expected failure, off-grid means outside their neighbours (the issue measured that at G = 63).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from miroflow.config import Params, apply_overrides
from miroflow.evaluate import generate, sample_seed, score_images
from miroflow.pipeline import load_pipeline
from miroflow.prepare import run_prepare
from miroflow.prompts import load_prompt_set
from miroflow.score import run_bin, run_score
from miroflow.train import run_train

pytestmark = pytest.mark.slow

REWARDS = ["sharpness", "contrast", "noise"]
NUM_BINS = 16
G = NUM_BINS - 1
OFF_GRID = (0.25, 0.5, 0.75)
PROMPTS = "shapes:8"  # 48 prompts, every category
SEEDS_PER_PROMPT = 2
STEPS = 20


@dataclass(frozen=True)
class Point:
    """Sharpness of the images sampled at one target: mean and standard error over ``n`` images."""

    target: float
    values: np.ndarray

    @property
    def mean(self) -> float:
        """Mean sharpness."""
        return float(np.mean(self.values))

    @property
    def se(self) -> float:
        """Standard error of the mean."""
        return float(np.std(self.values, ddof=1) / math.sqrt(len(self.values)))


def data_params(root: Path) -> Params:
    """512 shapes samples in two shards, scored with :data:`REWARDS`, 16 bins."""
    return apply_overrides(
        Params(),
        [
            f"storage.root={root}/store",
            "data.num_samples=512",
            "data.shard_size=256",
            f"data.manifest={root}/manifests/shards.json",
            f"score.manifest={root}/manifests/scores.json",
            f"score.bins={root}/manifests/bins.json",
            f"score.num_bins={NUM_BINS}",
            f"score.rewards={json.dumps(REWARDS)}",
            "score.device=cpu",
            "tracking.enabled=false",
        ],
    )


def prepare_data(root: Path) -> Params:
    """Prepare, score and bin the dataset of :func:`data_params`."""
    params = data_params(root)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return params


def train(params: Params, features: str) -> str:
    """Train a tiny MIRO model with the ``features`` reward embedding; returns its final checkpoint."""
    p = apply_overrides(
        params,
        [
            f"train.run_name=grid-{features}",
            f"train.reward_features={features}",
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
        ],
    )
    torch.manual_seed(0)  # the learned text encoder is built from the global RNG before train.seed is set
    return run_train(p).checkpoint


def sweep(checkpoint: str, targets: list[float], features: str | None = None) -> dict[float, Point]:
    """Sharpness of images sampled at each sharpness target (others 1, ω = 0, same prompts and seeds).

    ``features`` reads the checkpoint's weights with another reward-embedding mode (both modes have
    the same parameters); None keeps the checkpoint's own.
    """
    pipe = load_pipeline(checkpoint, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.reward_names == REWARDS
    if features is not None:
        pipe.denoiser.reward_embedder.features = features  # type: ignore[assignment]
    items = load_prompt_set(PROMPTS)
    prompts = [it.prompt for it in items for _ in range(SEEDS_PER_PROMPT)]
    seeds = [sample_seed(0, i, j) for i in range(len(items)) for j in range(SEEDS_PER_PROMPT)]
    out = {}
    for target in targets:
        imgs = generate(pipe, prompts, seeds, num_inference_steps=STEPS, reward_targets={"sharpness": target})
        out[target] = Point(target, score_images(imgs, prompts, ["sharpness"])["sharpness"])
    return out


def neighbours(s: float) -> tuple[float, float]:
    """The grid values ``floor(s·G)/G`` and ``ceil(s·G)/G`` around an off-grid ``s``."""
    k = math.floor(s * G)
    return k / G, (k + 1) / G


def paired(a: Point, b: Point) -> tuple[float, float]:
    """Mean and standard error of the per-image difference ``a - b`` (same prompts and seeds)."""
    d = a.values - b.values
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d)))


def between(points: dict[float, Point], s: float) -> tuple[bool, str]:
    """Whether the mean at ``s`` lies between its neighbours' means within 2 standard errors, and a
    line describing it.

    Every target is sampled from the same prompts and seeds, so the standard error that matters is
    the one of the paired per-image differences (the spread between images cancels): with ``lower``
    / ``upper`` the neighbour of lower / higher mean, ``mean(x_s - x_lower) >= -2·SE`` and
    ``mean(x_s - x_upper) <= 2·SE``. The line also gives the means with their own (unpaired) SEs and
    the linear interpolation of the neighbours' means at ``s``.
    """
    lo_t, hi_t = neighbours(s)
    lo, hi, mid = points[lo_t], points[hi_t], points[s]
    lower, upper = (lo, hi) if lo.mean <= hi.mean else (hi, lo)
    d_low, se_low = paired(mid, lower)
    d_up, se_up = paired(mid, upper)
    ok = d_low >= -2 * se_low and d_up <= 2 * se_up
    w = s * G - math.floor(s * G)
    line = (
        f"target {s:.4f}: {mid.mean:.4f} ± {mid.se:.4f} (linear between neighbours: "
        f"{lo.mean + w * (hi.mean - lo.mean):.4f}); neighbours {lo_t:.4f}: {lo.mean:.4f} ± {lo.se:.4f}, "
        f"{hi_t:.4f}: {hi.mean:.4f} ± {hi.se:.4f}; paired: minus lower {d_low:+.4f} ± {se_low:.4f}, "
        f"minus upper {d_up:+.4f} ± {se_up:.4f} -> {'between' if ok else 'OUTSIDE'}"
    )
    return ok, line


def sweep_targets() -> list[float]:
    """Every off-grid target of :data:`OFF_GRID` and its two grid neighbours, ascending."""
    return sorted({t for s in OFF_GRID for t in (s, *neighbours(s))})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny MIRO model trained (``grid_interp``, the default) on the prepared, scored, binned data."""
    return train(prepare_data(tmp_path_factory.mktemp("reward_grid")), "grid_interp")


@pytest.fixture(scope="module")
def grid_points(checkpoint: str) -> dict[float, Point]:
    """The target sweep of the trained model."""
    return sweep(checkpoint, sweep_targets())


@pytest.fixture(scope="module")
def fourier_points(checkpoint: str) -> dict[float, Point]:
    """The same sweep with the same weights read by the original ``fourier`` embedding.

    Training only shows grid values, where both modes compute the same function, so a model trained
    with ``fourier`` from the same seed has these very weights (a separately trained one gave the
    same grid means); only the off-grid targets differ.
    """
    return sweep(checkpoint, sweep_targets(), features="fourier")


def _report(name: str, points: dict[float, Point]) -> list[tuple[bool, str]]:
    results = [between(points, s) for s in OFF_GRID]
    n = len(points[OFF_GRID[0]].values)
    print(f"\n{name}: sharpness by target (ω = 0, {n} images each):\n" + "\n".join(line for _, line in results))
    return results


def test_off_grid_targets_lie_between_their_grid_neighbours(grid_points: dict[float, Point]) -> None:
    assert all(abs(s * G - round(s * G)) > 0.1 for s in OFF_GRID)  # really off the grid
    results = _report("grid_interp", grid_points)
    assert all(ok for ok, _ in results), [line for _, line in results]
    # The sweep also moves sharpness: the model follows the target at all.
    assert grid_points[neighbours(0.75)[1]].mean > grid_points[neighbours(0.25)[0]].mean


def test_both_embeddings_agree_on_the_grid(grid_points: dict[float, Point], fourier_points: dict[float, Point]) -> None:
    """On grid values grid_interp is exactly the original embedding: same images, same scores."""
    on_grid = [t for t in grid_points if t not in OFF_GRID]
    assert len(on_grid) == 2 * len(OFF_GRID)
    for t in on_grid:
        assert np.array_equal(grid_points[t].values, fourier_points[t].values), t


@pytest.mark.xfail(reason="the original embedding: off-grid targets are points training never showed", strict=False)
def test_fourier_off_grid_targets_lie_between_their_grid_neighbours(fourier_points: dict[float, Point]) -> None:
    results = _report("fourier", fourier_points)
    assert all(ok for ok, _ in results), [line for _, line in results]
