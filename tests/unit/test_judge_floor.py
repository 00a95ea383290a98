"""The shapes judge's floor (:mod:`miroflow.judge_floor`): ≤ 0.02 on object-free inputs, ≥ 0.98 on clean renders."""

from __future__ import annotations

import numpy as np
import pytest

from miroflow import judge_floor as jf
from miroflow.data.shapes import CATEGORIES
from miroflow.prompts import load_prompt_set
from miroflow.rewards import shapes_judge as sj

KEYS = [*CATEGORIES, "overall"]


@pytest.mark.parametrize(("resolution", "images_per_prompt"), [(32, 2), (64, 1)])
def test_floor_is_at_most_two_percent_in_every_category(resolution: int, images_per_prompt: int) -> None:
    floor = jf.judge_floor(resolution, images_per_prompt=images_per_prompt, seed=0)
    assert list(floor) == list(jf.INPUT_KINDS)
    for kind, acc in floor.items():
        assert list(acc) == KEYS, kind
        for cat, a in acc.items():
            assert 0.0 <= a <= 0.02, (resolution, kind, cat, a)


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_renders_of_the_eval_prompts_are_judged_correct(resolution: int) -> None:
    acc = jf.clean_accuracy(resolution)
    assert list(acc) == KEYS
    assert all(a >= 0.98 for a in acc.values()), acc


def test_degraded_renders_stay_mostly_correct() -> None:
    """The dataset's own degradation mix (params.yaml defaults; 0.98 overall when measured) is not destroyed."""
    mixed = jf.degraded_accuracy(32, seed=0)
    assert mixed["overall"] >= 0.9, mixed
    noisy = jf.degraded_accuracy(32, degradation=("noise", 0.2), seed=0)
    assert noisy["overall"] >= 0.85, noisy


def test_the_floor_check_can_fail_without_the_noise_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the significance test switched off (the old detector), uniform noise scores again."""
    monkeypatch.setattr(sj, "_MIN_SNR_OBJ", 0.0)
    monkeypatch.setattr(sj, "_MIN_SNR_PX", 0.0)
    monkeypatch.setattr(sj, "_MIN_CONTRAST", -1.0)
    floor = jf.judge_floor(32, images_per_prompt=2, seed=0)
    assert floor["uniform_noise"]["single_object"] > 0.2 and floor["uniform_noise"]["overall"] > 0.05, floor
    assert floor["blank"]["overall"] == 0.0  # nothing to find in a constant image either way


def test_inputs_are_seeded_and_of_the_documented_kinds() -> None:
    rng = np.random.default_rng(0)
    for kind in jf.INPUT_KINDS:
        img = jf.floor_image(kind, 32, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    blank = jf.floor_image("blank", 16, np.random.default_rng(1))
    assert (blank == blank[0, 0]).all()
    assert np.array_equal(
        jf.floor_image("gaussian_noise", 32, np.random.default_rng(5)),
        jf.floor_image("gaussian_noise", 32, np.random.default_rng(5)),
    )
    assert jf.judge_floor(32, images_per_prompt=1, seed=3) == jf.judge_floor(32, images_per_prompt=1, seed=3)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: jf.floor_image("pink_noise", 32, np.random.default_rng(0)), "unknown input kind 'pink_noise'"),
        (lambda: jf.floor_image("blank", 4, np.random.default_rng(0)), "resolution must be an int ≥ 8"),
        (lambda: jf.judge_floor(resolution=8), "resolution must be an int ≥ 16"),
        (lambda: jf.judge_floor(images_per_prompt=0), "images_per_prompt must be a positive int"),
        (lambda: jf.clean_accuracy(resolution=True), "resolution must be an int"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_rejected(call: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()  # type: ignore[operator]


def test_wrong_shaped_images_are_rejected_with_their_shape() -> None:
    items = load_prompt_set("shapes", 2)
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
        jf.judge_accuracy(items, [np.zeros((3, 32, 32), np.uint8)] * 2)
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        jf.judge_accuracy(items, [np.zeros((32, 32, 3), np.uint8)])
