"""The synthetic *shapes* domain: rendering, degradations and dataset samples.

Images show 1–4 coloured geometric objects (circle, square, triangle) on a plain light-grey
background. Everything is procedural and seeded, so any slice of a dataset can be regenerated
byte for byte from ``(cfg.seed, index)``.

Scene graphs, the caption grammar, captions and the evaluation prompts are in
:mod:`miroflow.data.scenes`; its public names are re-exported here.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from miroflow.config import DataConfig, DegradationConfig
from miroflow.data.sample import Sample
from miroflow.data.scenes import (
    CATEGORIES,
    COLORS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    caption_for,
    eval_prompts,
    noisy_caption,
    relations_between,
    sample_scene,
)

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "BACKGROUND",
    "NUMBER_WORDS",
    "sample_scene",
    "caption_for",
    "render",
    "degrade",
    "apply_degradation",
    "noisy_caption",
    "generate_sample",
    "iter_samples",
    "eval_prompts",
    "relations_between",
]

BACKGROUND: tuple[int, int, int] = (230, 230, 230)
_SUPERSAMPLE = 4


# ----------------------------------------------------------------------------- rendering


def _coverage(shape: str, cx: float, cy: float, size: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean inside-test at sub-pixel centres ``xs [1, N]``, ``ys [M, 1]`` (normalised units)."""
    h = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":  # apex up, base = height = size
        top = cy - h
        return (ys >= top) & (ys <= cy + h) & (np.abs(xs - cx) <= (ys - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render(scene: dict[str, Any], resolution: int) -> np.ndarray:
    """Render a scene graph without degradation.

    Args:
        scene: scene graph with normalised coordinates.
        resolution: image side H = W in pixels (≥ 16).

    Returns:
        ``uint8`` array ``[H, W, 3]`` (RGB), anti-aliased by 4×4 supersampling.
    """
    if resolution < 16:
        raise ValueError(f"resolution must be ≥ 16 px, got {resolution}")
    img = np.empty((resolution, resolution, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)
    ss = _SUPERSAMPLE
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        c0, r0 = max(int(np.floor(x0 * resolution)) - 1, 0), max(int(np.floor(y0 * resolution)) - 1, 0)
        c1, r1 = min(int(np.ceil(x1 * resolution)) + 1, resolution), min(int(np.ceil(y1 * resolution)) + 1, resolution)
        xs = ((np.arange(c0 * ss, c1 * ss) + 0.5) / (ss * resolution))[None, :]
        ys = ((np.arange(r0 * ss, r1 * ss) + 0.5) / (ss * resolution))[:, None]
        inside = _coverage(obj["shape"], obj["center"][0], obj["center"][1], obj["size"], xs, ys)
        cov = inside.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3), dtype=np.float32)[..., None]
        colour = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        img[r0:r1, c0:c1] = img[r0:r1, c0:c1] * (1 - cov) + colour * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- degradations

DEGRADATIONS: tuple[str, ...] = ("blur", "contrast", "noise", "jpeg")


def _noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = x + rng.normal(0.0, std, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def apply_degradation(image: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """Apply one degradation deterministically.

    Args:
        image: ``uint8 [H, W, 3]``.
        kind: ``"blur"`` (Gaussian sigma in pixels), ``"noise"`` (additive Gaussian std in [0, 1]
            intensity units), ``"contrast"`` (factor around the image's mean grey; 1 = unchanged)
            or ``"jpeg"`` (quality 1–95).
        strength: the parameter above.
        seed: seed of the noise pattern (``"noise"`` only).

    Returns:
        ``uint8 [H, W, 3]``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if kind == "blur":
        x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(strength, strength, 0), mode="nearest")
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if kind == "noise":
        return _noise(image, strength, np.random.default_rng(seed))
    if kind == "contrast":
        x = image.astype(np.float32)
        mean = float(x.mean())
        return np.clip(np.rint(mean + strength * (x - mean)), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(round(strength)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
    raise ValueError(f"unknown degradation {kind!r}; valid: {', '.join(DEGRADATIONS)}")


def degrade(
    image: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig, resolution: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Randomly degrade an image in the order blur → contrast → noise → jpeg.

    Each degradation is applied with its probability from ``cfg`` and a strength drawn uniformly
    from its range; blur sigma is given at 32 px and scaled by ``resolution / 32``. The same
    number of random draws is consumed whatever is applied, so later draws stay aligned.

    Returns:
        (``uint8 [H, W, 3]`` image, ``{"blur": sigma_px, "contrast": factor, "noise": std,
        "jpeg": quality}`` restricted to the degradations applied; empty if clean).
    """
    u = rng.random(4)
    strengths = {
        "blur": float(rng.uniform(*cfg.blur_sigma)) * resolution / 32.0,
        "contrast": float(rng.uniform(*cfg.contrast_factor)),
        "noise": float(rng.uniform(*cfg.noise_std)),
        "jpeg": float(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)),
    }
    noise_seed = int(rng.integers(2**31))
    probs = {"blur": cfg.blur_prob, "contrast": cfg.low_contrast_prob, "noise": cfg.noise_prob, "jpeg": cfg.jpeg_prob}
    applied: dict[str, float] = {}
    for i, kind in enumerate(DEGRADATIONS):
        if u[i] < probs[kind]:
            image = apply_degradation(image, kind, strengths[kind], seed=noise_seed)
            applied[kind] = strengths[kind]
    return image, applied


# ----------------------------------------------------------------------------- samples


def generate_sample(index: int, cfg: DataConfig) -> Sample:
    """Sample ``index`` of the dataset described by ``cfg`` (deterministic per ``(cfg.seed, index)``).

    Caption choice: with probability ``cfg.swap_caption_fraction`` the caption describes another,
    independently sampled scene with a different caption (``meta["swapped"] = True``; ``meta["scene"]``
    is still the true scene, ``meta["caption_scene"]`` the other one). With
    ``cfg.synthetic_captions`` the ``.txt`` caption is the noisy "original" (of the swapped scene
    when swapped: the web text is what mismatches) and ``meta["captions"]["synthetic"]`` is the
    accurate caption of the true scene (a captioner looks at the image). ``meta["category"]`` is the
    category of the scene the stored caption was written for.
    """
    rng = np.random.default_rng([cfg.seed, index])
    scene = sample_scene(rng, None, cfg.max_objects)
    image = render(scene, cfg.resolution)
    image, applied = degrade(image, rng, cfg.degradations, cfg.resolution)
    swapped = bool(rng.random() < cfg.swap_caption_fraction)
    caption_scene = scene
    if swapped:
        own = caption_for(scene)
        while True:
            caption_scene = sample_scene(rng, None, cfg.max_objects)
            if caption_for(caption_scene) != own:
                break
    meta: dict[str, Any] = {
        "scene": scene,
        "category": caption_scene["category"],
        "degradations": applied,
        "swapped": swapped,
        "resolution": cfg.resolution,
    }
    if swapped:
        meta["caption_scene"] = caption_scene
    if cfg.synthetic_captions:
        caption = noisy_caption(caption_scene, rng)
        meta["captions"] = {"original": caption, "synthetic": caption_for(scene)}
    else:
        caption = caption_for(caption_scene)
    meta["caption"] = caption
    return Sample(key=f"{cfg.split}-{index:08d}", image=image, caption=caption, meta=meta, image_ext=cfg.image_format)


def iter_samples(cfg: DataConfig, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """Samples ``start .. stop - 1`` (``stop`` defaults to ``cfg.num_samples``)."""
    end = cfg.num_samples if stop is None else stop
    for i in range(start, end):
        yield generate_sample(i, cfg)
