"""The exact shapes judge and the ``shapes_alignment`` reward."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch

from miroflow.config import DataConfig
from miroflow.data import shapes
from miroflow.rewards import Reward, create_reward
from miroflow.rewards import shapes_judge as sj

N_PER_CATEGORY = 100


def _obj(shape: str, color: str, cx: float, cy: float, size: float = 0.3) -> dict[str, object]:
    h = size / 2
    return {"shape": shape, "color": color, "center": [cx, cy], "size": size, "bbox": [cx - h, cy - h, cx + h, cy + h]}


def _image(*objs: dict[str, object], resolution: int = 32) -> np.ndarray:
    return shapes.render({"category": "two_object", "objects": list(objs), "relation": None}, resolution)


@lru_cache(maxsize=None)
def _cases(resolution: int) -> tuple[tuple[str, np.ndarray, str, str], ...]:
    """N_PER_CATEGORY seeded (category, clean image, caption, another scene's caption) per category."""
    rng = np.random.default_rng(resolution)
    out = []
    for cat in shapes.CATEGORIES:
        for _ in range(N_PER_CATEGORY):
            scene = shapes.sample_scene(rng, cat)
            caption = other = shapes.caption_for(scene)
            while other == caption:
                other = shapes.caption_for(shapes.sample_scene(rng))
            out.append((cat, shapes.render(scene, resolution), caption, other))
    return tuple(out)


def _accuracy(
    resolution: int, swap: bool = False, degradation: tuple[str, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Per category (GenEval accuracy, mean score) over N_PER_CATEGORY seeded scenes."""
    results: dict[str, list[tuple[bool, float]]] = {c: [] for c in shapes.CATEGORIES}
    for i, (cat, img, caption, other) in enumerate(_cases(resolution)):
        if degradation is not None:
            img = shapes.apply_degradation(img, degradation[0], degradation[1], seed=i)
        res = sj.judge(img, other if swap else caption)
        assert res.parsed and (swap or res.category == cat)
        results[cat].append((res.correct, res.score))
    return {c: (float(np.mean([r[0] for r in v])), float(np.mean([r[1] for r in v]))) for c, v in results.items()}


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("caption", "category", "facts"),
    [
        ("a circle", "single_object", ["at least 1 circle"]),
        ("a yellow square", "colors", ["at least 1 square", "at least 1 yellow square"]),
        ("a circle and a square", "two_object", ["at least 1 circle", "at least 1 square"]),
        (
            "a red circle and a green triangle",
            "color_attr",
            ["at least 1 circle", "at least 1 red circle", "at least 1 triangle", "at least 1 green triangle"],
        ),
        (
            "three green triangles",
            "counting",
            ["at least 1 triangle", "at least 1 green triangle", "exactly 3 green triangles"],
        ),
        ("two squares", "counting", ["at least 1 square", "exactly 2 squares"]),
        (
            "a red circle left of a blue square",
            "position",
            [
                "at least 1 circle",
                "at least 1 red circle",
                "at least 1 square",
                "at least 1 blue square",
                "red circle left of blue square",
            ],
        ),
        (
            "A photo of a Red circle to the right of a blue square.",
            "position",
            [
                "at least 1 circle",
                "at least 1 red circle",
                "at least 1 square",
                "at least 1 blue square",
                "red circle right of blue square",
            ],
        ),
        (
            "a triangle below a circle",
            "position",
            ["at least 1 triangle", "at least 1 circle", "triangle below circle"],
        ),
        ("a circle and a circle", "two_object", ["at least 2 circles", "at least 2 circles"]),
    ],
)
def test_parse_templates(caption: str, category: str, facts: list[str]) -> None:
    parsed = sj.parse_caption(caption)
    assert parsed.parsed and parsed.category == category and parsed.unparsed == ()
    assert [f.text for f in parsed.facts] == facts


def test_every_template_and_noisy_caption_parses_or_is_generic() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        parsed = sj.parse_caption(shapes.caption_for(scene))
        assert parsed.category == scene["category"] and not parsed.unparsed
        noisy = sj.parse_caption(shapes.noisy_caption(scene, rng))
        assert noisy.parsed or noisy.category is None
        assert len(noisy.facts) <= len(parsed.facts) + 1  # vaguer, or one fact changed


@pytest.mark.parametrize(
    "caption", ["some shapes", "", "a photo of", "colourful shapes on a grey background", "a purple hexagon"]
)
def test_unparseable_captions_have_no_facts(caption: str) -> None:
    parsed = sj.parse_caption(caption)
    assert not parsed.parsed and parsed.category is None
    res = sj.judge(_image(_obj("circle", "red", 0.5, 0.5)), caption)
    assert not res.parsed and math.isnan(res.score) and not res.correct and res.facts == []


def test_partial_parse_keeps_what_parses() -> None:
    parsed = sj.parse_caption("a red circle and some shapes")
    assert parsed.category == "colors" and parsed.unparsed == ("some shapes",)
    relation_lost = sj.parse_caption("a red circle left of something")
    assert relation_lost.relation is None and [f.text for f in relation_lost.facts] == [
        "at least 1 circle",
        "at least 1 red circle",
    ]
    with pytest.raises(TypeError, match="caption must be a str"):
        sj.parse_caption(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_accuracy_per_category(resolution: int) -> None:
    acc = _accuracy(resolution)
    for cat, (a, s) in acc.items():
        assert a >= 0.98 and s >= 0.98, (resolution, cat, a, s)


def test_swapped_captions_fail() -> None:
    acc = _accuracy(32, swap=True)
    for cat, (a, s) in acc.items():
        assert a <= 0.3 and s <= 0.6, (cat, a, s)
    assert np.mean([a for a, _ in acc.values()]) <= 0.2


@pytest.mark.parametrize(
    ("kind", "strength", "min_acc"),
    [("blur", 1.0, 0.95), ("noise", 0.05, 0.95), ("noise", 0.1, 0.95), ("contrast", 0.2, 0.95)],
)
def test_mild_degradations_keep_the_judge_reasonable(kind: str, strength: float, min_acc: float) -> None:
    acc = _accuracy(32, degradation=(kind, strength))
    for cat, (a, s) in acc.items():
        assert a >= min_acc and s >= 0.97, (kind, strength, cat, a, s)


def test_dataset_alignment_separates_swapped_samples() -> None:
    """On real training samples (default degradations) the reward tells swapped captions apart."""
    cfg = DataConfig(seed=0, num_samples=200)
    true_scores, swapped_scores = [], []
    for s in shapes.iter_samples(cfg):
        assert s.image is not None
        res = sj.judge(s.image, s.caption)
        (swapped_scores if s.meta["swapped"] else true_scores).append(res.score)
    assert np.mean(true_scores) >= 0.9 and np.mean(swapped_scores) <= 0.45


# ----------------------------------------------------------------------------- graded facts


def test_scores_are_fractions_of_facts() -> None:
    blue_circle = _image(_obj("circle", "blue", 0.5, 0.5))
    res = sj.judge(blue_circle, "a red circle")
    assert (
        res.score == 0.5
        and not res.correct
        and res.facts == [("at least 1 circle", True), ("at least 1 red circle", False)]
    )
    assert sj.judge(blue_circle, "a square").score == 0.0
    assert sj.judge(blue_circle, "a blue circle").correct

    two = _image(*(_obj("triangle", "green", x, 0.5, 0.26) for x in (0.25, 0.72)))
    res = sj.judge(two, "three green triangles")
    assert res.score == pytest.approx(2 / 3) and not res.correct
    assert sj.judge(two, "two green triangles").correct
    assert sj.judge(two, "two triangles").correct
    assert not sj.judge(two, "two red triangles").correct

    pair = _image(_obj("circle", "red", 0.25, 0.5), _obj("square", "blue", 0.75, 0.5))
    assert sj.judge(pair, "a red circle left of a blue square").correct
    wrong = sj.judge(pair, "a red circle right of a blue square")
    assert wrong.score == pytest.approx(4 / 5) and not wrong.correct
    assert not sj.judge(pair, "a blue circle and a red square").correct  # colour attribution swapped
    assert sj.judge(pair, "a red circle and a blue square").correct


def test_detections() -> None:
    img = _image(
        _obj("circle", "red", 0.25, 0.3),
        _obj("square", "yellow", 0.75, 0.3),
        _obj("triangle", "blue", 0.5, 0.75),
        resolution=64,
    )
    dets = sj.detect_objects(img)
    assert sorted((d.shape, d.color) for d in dets) == [("circle", "red"), ("square", "yellow"), ("triangle", "blue")]
    circle = next(d for d in dets if d.shape == "circle")
    assert circle.center == pytest.approx((0.25, 0.3), abs=0.03)
    assert circle.bbox == pytest.approx((0.1, 0.15, 0.4, 0.45), abs=0.04)
    assert sj.detect_objects(np.full((32, 32, 3), 230, np.uint8)) == []
    as_float = sj.judge(img.astype(np.float32) / 255, "a blue triangle below a red circle")
    assert as_float.correct and as_float.category == "position"
    assert isinstance(circle.as_dict()["bbox"], list)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "pattern"),
    [
        (np.zeros((3, 32, 32), np.uint8), r"\(3, 32, 32\)"),
        (np.zeros((32, 32), np.uint8), r"\(32, 32\)"),
        (np.zeros((32, 32, 4), np.uint8), r"\(32, 32, 4\)"),
        (np.zeros((32, 32, 3), np.int64), "dtype int64"),
    ],
)
def test_judge_rejects_bad_images(image: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        sj.judge(image, "a red circle")


# ----------------------------------------------------------------------------- the reward


def test_reward_registry_and_batch_scoring() -> None:
    reward = create_reward("shapes_alignment")
    assert isinstance(reward, Reward) and reward.name == "shapes_alignment" and reward.uses_prompt
    rng = np.random.default_rng(1)
    scenes = [shapes.sample_scene(rng, c) for c in shapes.CATEGORIES]
    imgs = np.stack([shapes.render(s, 32) for s in scenes])
    batch = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    prompts = [shapes.caption_for(s) for s in scenes]
    prompts[0] = "some shapes"
    prompts[1] = shapes.caption_for(shapes.sample_scene(rng, "counting"))
    raw = reward.score(batch, prompts)
    assert raw.dtype == torch.float32 and raw.shape == (6,)
    assert math.isnan(raw[0]) and raw[1] < 1 and torch.all(raw[2:] == 1)
    expected = [sj.judge(img, p).score for img, p in zip(imgs, prompts)]
    assert np.allclose(raw.numpy()[1:], expected[1:])
    assert torch.equal(reward.normalize(raw[1:]), raw[1:])
    zero = create_reward("shapes_alignment", unparseable_score=0.0).score(batch[:1], prompts[:1])
    assert zero.tolist() == [0.0]


@pytest.mark.parametrize(
    ("images", "prompts", "pattern"),
    [
        (torch.rand(2, 32, 32), ["a", "b"], r"\[B, 3, H, W\], got \(2, 32, 32\)"),
        (torch.rand(2, 32, 32, 3), ["a", "b"], r"got \(2, 32, 32, 3\)"),
        (torch.rand(2, 3, 32, 32), ["a circle"], "2 images but 1 prompts"),
    ],
)
def test_reward_rejects_bad_batches(images: torch.Tensor, prompts: list[str], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        sj.ShapesAlignmentReward().score(images, prompts)
