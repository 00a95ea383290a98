"""The synthetic shapes domain: scene graphs, captions, rendering, degradations, samples."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from miroflow.config import DataConfig, DegradationConfig
from miroflow.data import scenes, shapes
from miroflow.data.sample import Sample

NO_DEGRADATION = DegradationConfig(blur_prob=0, noise_prob=0, low_contrast_prob=0, jpeg_prob=0)
ALL_DEGRADATIONS = DegradationConfig(blur_prob=1, noise_prob=1, low_contrast_prob=1, jpeg_prob=1)


def _obj(shape: str, color: str, cx: float, cy: float, size: float = 0.3) -> dict[str, Any]:
    h = size / 2
    return {"shape": shape, "color": color, "center": [cx, cy], "size": size, "bbox": [cx - h, cy - h, cx + h, cy + h]}


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary() -> None:
    assert shapes.CATEGORIES == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert {"red", "green", "blue", "yellow"} <= set(shapes.COLORS)
    assert {"circle", "square", "triangle"} <= set(shapes.SHAPES)
    rgb = [np.array(c, dtype=float) for c in [*shapes.COLORS.values(), shapes.BACKGROUND]]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)) > 100  # well separated


# ----------------------------------------------------------------------------- scenes


@pytest.mark.parametrize("category", shapes.CATEGORIES)
def test_scene_structure(category: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        scene = shapes.sample_scene(rng, category)
        assert json.loads(json.dumps(scene)) == scene  # JSON-serialisable, no numpy scalars
        assert scene["category"] == category
        objs = scene["objects"]
        n = {"single_object": 1, "colors": 1, "two_object": 2, "color_attr": 2, "position": 2}.get(category)
        assert len(objs) == n if n else 2 <= len(objs) <= 4
        for o in objs:
            assert o["shape"] in shapes.SHAPES and o["color"] in shapes.COLORS
            x0, y0, x1, y1 = o["bbox"]
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
            assert o["size"] * 32 >= 7  # detectable at 32 px
            assert o["center"] == pytest.approx([(x0 + x1) / 2, (y0 + y1) / 2])
        for a, b in itertools.combinations(objs, 2):  # non-overlapping with a margin
            ax0, ay0, ax1, ay1 = a["bbox"]
            bx0, by0, bx1, by1 = b["bbox"]
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= scenes.GAP - 1e-9
        if category == "counting":
            assert len({(o["shape"], o["color"]) for o in objs}) == 1
        if category in ("two_object", "color_attr"):
            assert objs[0]["shape"] != objs[1]["shape"]
        if category == "color_attr":
            assert objs[0]["color"] != objs[1]["color"]
        if category == "position":
            rel = scene["relation"]
            a, b = objs[rel["subject"]], objs[rel["object"]]
            assert (a["shape"], a["color"]) != (b["shape"], b["color"])
            assert shapes.relations_between(a["bbox"], b["bbox"]) == {rel["relation"]}
        else:
            assert scene["relation"] is None


def test_scene_sampling_uniform_and_limits() -> None:
    rng = np.random.default_rng(0)
    counts = Counter(shapes.sample_scene(rng)["category"] for _ in range(1200))
    assert set(counts) == set(shapes.CATEGORIES)
    assert all(140 <= c <= 260 for c in counts.values()), counts
    assert all(len(shapes.sample_scene(rng, "counting", max_objects=2)["objects"]) == 2 for _ in range(20))
    one = [shapes.sample_scene(rng, None, max_objects=1) for _ in range(60)]
    assert {s["category"] for s in one} == {"single_object", "colors", "counting"}
    assert all(len(s["objects"]) == 1 for s in one)
    with pytest.raises(ValueError, match="unknown category 'blob'"):
        shapes.sample_scene(rng, "blob")
    with pytest.raises(ValueError, match="needs 2 objects"):
        shapes.sample_scene(rng, "position", max_objects=1)
    with pytest.raises(ValueError, match="max_objects"):
        shapes.sample_scene(rng, None, max_objects=5)


def test_relations_between() -> None:
    left, right = [0.1, 0.4, 0.3, 0.6], [0.6, 0.4, 0.8, 0.6]
    top, bottom = [0.4, 0.1, 0.6, 0.3], [0.4, 0.6, 0.6, 0.8]
    assert shapes.relations_between(left, right) == {"left of"}
    assert shapes.relations_between(right, left) == {"right of"}
    assert shapes.relations_between(top, bottom) == {"above"}  # y grows downwards
    assert shapes.relations_between(bottom, top) == {"below"}
    assert shapes.relations_between(left, [0.6, 0.9, 0.8, 1.1]) == {"left of", "above"}  # diagonal
    assert shapes.relations_between(left, [0.6, 0.6, 0.8, 0.8]) == {"left of"}  # within 60° of the x axis
    assert shapes.relations_between(left, [0.12, 0.42, 0.32, 0.62]) == set()  # within the slack


# ----------------------------------------------------------------------------- captions


def test_caption_templates() -> None:
    red_circle, blue_square = _obj("circle", "red", 0.25, 0.5), _obj("square", "blue", 0.75, 0.5)
    cases = {
        "a circle": {"category": "single_object", "objects": [red_circle], "relation": None},
        "a red circle": {"category": "colors", "objects": [red_circle], "relation": None},
        "a circle and a square": {"category": "two_object", "objects": [red_circle, blue_square], "relation": None},
        "a red circle and a blue square": {
            "category": "color_attr",
            "objects": [red_circle, blue_square],
            "relation": None,
        },
        "a red circle left of a blue square": {
            "category": "position",
            "objects": [red_circle, blue_square],
            "relation": {"subject": 0, "relation": "left of", "object": 1},
        },
        "three green triangles": {
            "category": "counting",
            "objects": [_obj("triangle", "green", x, 0.5, 0.2) for x in (0.2, 0.5, 0.8)],
            "relation": None,
        },
    }
    for caption, scene in cases.items():
        assert shapes.caption_for(scene) == caption
    with pytest.raises(ValueError, match="unknown category"):
        shapes.caption_for({"category": "nope", "objects": [], "relation": None})


def test_noisy_captions_are_vaguer_or_wrong_and_seeded() -> None:
    rng = np.random.default_rng(3)
    scenes = [shapes.sample_scene(rng, c) for c in shapes.CATEGORIES for _ in range(30)]
    noisy = [shapes.noisy_caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    again = [shapes.noisy_caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    assert noisy == again
    assert all(isinstance(c, str) and c for c in noisy)
    accurate = [shapes.caption_for(s) for s in scenes]
    same = sum(a == b for a, b in zip(noisy, accurate))
    assert 0.05 * len(scenes) < same < 0.4 * len(scenes)
    assert any(c in ("some shapes", "shapes", "geometric shapes") for c in noisy)
    assert any(w in c for c in noisy for w in ("one ", "two ", "three ", "four "))  # counts appear (some wrong)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_colours_and_background(resolution: int) -> None:
    scene = {
        "category": "color_attr",
        "objects": [_obj("circle", "red", 0.25, 0.5), _obj("triangle", "blue", 0.7, 0.5)],
        "relation": None,
    }
    img = shapes.render(scene, resolution)
    assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == shapes.BACKGROUND and tuple(img[-1, -1]) == shapes.BACKGROUND
    r = resolution
    assert tuple(img[r // 2, r // 4]) == shapes.COLORS["red"]  # circle centre
    assert tuple(img[int(0.6 * r), int(0.7 * r)]) == shapes.COLORS["blue"]  # lower middle of the triangle


def test_render_scales_with_resolution_and_areas_match_shapes() -> None:
    size = 0.3
    for shape, ratio in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        scene = {"category": "single_object", "objects": [_obj(shape, "green", 0.5, 0.5, size)], "relation": None}
        for res in (32, 64):
            img = shapes.render(scene, res).astype(float)
            bg = np.array(shapes.BACKGROUND, float)
            full = np.array(shapes.COLORS["green"], float)
            coverage = ((img - bg) @ (full - bg) / ((full - bg) @ (full - bg))).sum()  # area in px²
            assert coverage == pytest.approx(ratio * (size * res) ** 2, rel=0.03), (shape, res)
    with pytest.raises(ValueError, match="resolution"):
        shapes.render(scene, 8)


# ----------------------------------------------------------------------------- degradations


def _laplacian_var(img: np.ndarray) -> float:
    g = img.astype(float).mean(axis=2)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def test_apply_degradation_each_kind() -> None:
    img = shapes.render(shapes.sample_scene(np.random.default_rng(1), "counting"), 32)
    blurred = shapes.apply_degradation(img, "blur", 1.5)
    assert _laplacian_var(blurred) < 0.3 * _laplacian_var(img)
    noisy = shapes.apply_degradation(img, "noise", 0.1, seed=4)
    assert np.array_equal(noisy, shapes.apply_degradation(img, "noise", 0.1, seed=4))
    assert not np.array_equal(noisy, shapes.apply_degradation(img, "noise", 0.1, seed=5))
    assert 15 < (noisy.astype(float) - img).std() < 30  # ≈ 0.1 · 255 before clipping
    faded = shapes.apply_degradation(img, "contrast", 0.3)
    assert faded.astype(float).std() == pytest.approx(0.3 * img.astype(float).std(), rel=0.05)
    assert np.array_equal(shapes.apply_degradation(img, "contrast", 1.0), img)
    jpeg = shapes.apply_degradation(img, "jpeg", 10)
    assert jpeg.shape == img.shape and jpeg.dtype == np.uint8 and not np.array_equal(jpeg, img)
    for out in (blurred, noisy, faded, jpeg):
        assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown degradation 'sepia'"):
        shapes.apply_degradation(img, "sepia", 1.0)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        shapes.apply_degradation(img.transpose(2, 0, 1).copy(), "blur", 1.0)


def test_degrade_follows_probabilities_and_ranges() -> None:
    img = shapes.render(shapes.sample_scene(np.random.default_rng(2)), 64)
    out, applied = shapes.degrade(img, np.random.default_rng(0), NO_DEGRADATION, 64)
    assert applied == {} and np.array_equal(out, img)
    cfg = ALL_DEGRADATIONS
    for seed in range(10):
        out, applied = shapes.degrade(img, np.random.default_rng(seed), cfg, 64)
        assert set(applied) == {"blur", "noise", "contrast", "jpeg"}
        assert 2 * cfg.blur_sigma[0] <= applied["blur"] <= 2 * cfg.blur_sigma[1]  # scaled from 32 px to 64 px
        assert cfg.noise_std[0] <= applied["noise"] <= cfg.noise_std[1]
        assert cfg.contrast_factor[0] <= applied["contrast"] <= cfg.contrast_factor[1]
        assert cfg.jpeg_quality[0] <= applied["jpeg"] <= cfg.jpeg_quality[1]
        assert out.shape == img.shape and out.dtype == np.uint8
    a = shapes.degrade(img, np.random.default_rng(9), DegradationConfig(), 64)
    b = shapes.degrade(img, np.random.default_rng(9), DegradationConfig(), 64)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


# ----------------------------------------------------------------------------- samples


def _canon(sample: Sample) -> tuple[bytes, str, str, str]:
    assert sample.image is not None
    return sample.image.tobytes(), sample.caption, json.dumps(sample.meta, sort_keys=True), sample.key


def test_generate_sample_deterministic_and_seeded() -> None:
    cfg = DataConfig(seed=5, synthetic_captions=True)
    for i in (0, 17, 123_456):
        assert _canon(shapes.generate_sample(i, cfg)) == _canon(shapes.generate_sample(i, cfg))
    other = DataConfig(seed=6, synthetic_captions=True)
    a = [shapes.generate_sample(i, cfg) for i in range(8)]
    b = [shapes.generate_sample(i, other) for i in range(8)]
    assert all(not np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.key for s in a] == [f"train-{i:08d}" for i in range(8)]


def test_sample_meta_and_swaps() -> None:
    cfg = DataConfig(seed=1, num_samples=300, swap_caption_fraction=0.3, split="val", image_format="jpg")
    samples = list(shapes.iter_samples(cfg))
    assert len(samples) == 300
    swapped = 0
    for s in samples:
        assert isinstance(s, Sample) and s.image is not None and s.image.shape == (32, 32, 3)
        assert s.key.startswith("val-") and s.image_ext == "jpg"
        assert set(s.meta) >= {"caption", "scene", "category", "degradations", "swapped", "resolution"}
        assert "captions" not in s.meta
        assert s.meta["caption"] == s.caption and s.meta["resolution"] == 32
        json.dumps(s.meta)
        truth = shapes.caption_for(s.meta["scene"])
        if s.meta["swapped"]:
            swapped += 1
            assert s.caption != truth and s.caption == shapes.caption_for(s.meta["caption_scene"])
            assert s.meta["category"] == s.meta["caption_scene"]["category"]
        else:
            assert s.caption == truth and s.meta["category"] == s.meta["scene"]["category"]
    assert 60 <= swapped <= 120
    degraded = [s.meta["degradations"] for s in samples]
    assert 0.35 < np.mean(["blur" in d for d in degraded]) < 0.65  # blur_prob = 0.5


def test_synthetic_captions_and_slices() -> None:
    cfg = DataConfig(seed=2, num_samples=40, synthetic_captions=True, swap_caption_fraction=0.5, resolution=64)
    samples = list(shapes.iter_samples(cfg))
    assert samples[0].image is not None and samples[0].image.shape == (64, 64, 3)
    for s in samples:
        caps = s.meta["captions"]
        assert caps["original"] == s.caption == s.meta["caption"]
        assert caps["synthetic"] == shapes.caption_for(s.meta["scene"])  # accurate for the true scene
    tail = list(shapes.iter_samples(cfg, start=30, stop=35))
    assert [_canon(x) for x in tail] == [_canon(x) for x in samples[30:35]]
    assert list(shapes.iter_samples(cfg, start=40)) == []


# ----------------------------------------------------------------------------- evaluation set


def test_eval_prompts() -> None:
    recs = shapes.eval_prompts(5)
    assert len(recs) == 30 and [r["tag"] for r in recs] == [c for c in shapes.CATEGORIES for _ in range(5)]
    assert recs == shapes.eval_prompts(5) and recs != shapes.eval_prompts(5, seed=1)
    for r in recs:
        json.dumps(r)
        assert r["prompt"] == shapes.caption_for(r["scene"]) and r["scene"]["category"] == r["tag"]
        assert all(
            set(req) <= {"class", "count", "color", "position"} and req["class"] in shapes.SHAPES
            for req in r["include"]
        )
    counting = next(r for r in recs if r["tag"] == "counting")
    n = len(counting["scene"]["objects"])
    assert counting["include"][0]["count"] == n and counting["exclude"][0]["count"] == n + 1
    position = next(r for r in recs if r["tag"] == "position")
    assert position["include"][1]["position"] == [position["scene"]["relation"]["relation"], 0]
    single = next(r for r in recs if r["tag"] == "single_object")
    assert single["include"] == [{"class": single["scene"]["objects"][0]["shape"], "count": 1}]
