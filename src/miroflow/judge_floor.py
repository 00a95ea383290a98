"""The shapes judge's *floor*: its accuracy on inputs that contain no object at all.

An accuracy is only meaningful next to what the judge awards to images with nothing in them. This
module judges the evaluation prompt set (``load_prompt_set("shapes", None)``: 150 prompts, 25 per
GenEval category, the set ``miroflow evaluate`` uses) against three kinds of object-free input
and, for reference, against clean and degraded renders of each prompt's own scene:

=================  ==========================================================================
input kind         image ``[H, W, 3]`` uint8
=================  ==========================================================================
``uniform_noise``  every channel of every pixel uniform in 0–255 (what an untrained model emits)
``gaussian_noise`` per-pixel Gaussian around one grey level: mean uniform in [0.3, 0.9] (0.9 is
                   the shapes background), std uniform in [0.05, 0.3] (intensity units, [0, 1])
``blank``          one constant colour (uniform RGB per image): a model that draws nothing
=================  ==========================================================================

Accuracies follow :mod:`miroflow.evaluate`: per category the mean of the judge's GenEval-style
``correct`` over that category's images, ``overall`` the mean over categories. Everything is
seeded (``seed``), so a floor is reproducible bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from miroflow.config import DegradationConfig
from miroflow.data.shapes import CATEGORIES, apply_degradation, degrade, render
from miroflow.prompts import PromptItem, load_prompt_set
from miroflow.rewards.shapes_judge import judge

__all__ = [
    "INPUT_KINDS",
    "floor_image",
    "judge_accuracy",
    "judge_floor",
    "clean_accuracy",
    "degraded_accuracy",
]

#: The object-free inputs :func:`judge_floor` reports, in report order.
INPUT_KINDS: tuple[str, ...] = ("uniform_noise", "gaussian_noise", "blank")

_GAUSS_MEAN = (0.3, 0.9)
_GAUSS_STD = (0.05, 0.3)


def floor_image(kind: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One object-free image of ``kind`` (see the module table).

    Args:
        kind: one of :data:`INPUT_KINDS`.
        resolution: side H = W in pixels (≥ 8, the judge's minimum).
        rng: the only source of randomness.

    Returns:
        ``uint8 [H, W, 3]``.

    Raises:
        ValueError: unknown kind or a resolution under 8 px.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int ≥ 8 px, got {resolution!r}")
    shape = (resolution, resolution, 3)
    if kind == "uniform_noise":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if kind == "gaussian_noise":
        mean, std = rng.uniform(*_GAUSS_MEAN), rng.uniform(*_GAUSS_STD)
        x = rng.normal(mean, std, size=shape)
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if kind == "blank":
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)
        return np.broadcast_to(colour, shape).copy()
    raise ValueError(f"unknown input kind {kind!r}; valid: {', '.join(INPUT_KINDS)}")


def judge_accuracy(items: Sequence[PromptItem], images: Sequence[np.ndarray]) -> dict[str, float]:
    """GenEval-style accuracy of the judge: ``{category: mean correct, ..., "overall": mean over categories}``.

    Args:
        items: one prompt per image (its ``tag`` is the category).
        images: ``uint8 [H, W, 3]`` each, ``images[k]`` judged against ``items[k].prompt``.

    Raises:
        ValueError: the two sequences differ in length, no prompt parses, or an image has the wrong shape.
    """
    if len(items) != len(images):
        raise ValueError(f"judge_accuracy got {len(items)} prompts but {len(images)} images")
    by_tag: dict[str, list[bool]] = {}
    for item, img in zip(items, images):
        res = judge(img, item.prompt)
        if res.parsed:
            by_tag.setdefault(item.tag, []).append(bool(res.correct))
    if not by_tag:
        raise ValueError("judge_accuracy: no prompt has a checkable fact")
    acc = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
    ordered = {c: acc[c] for c in CATEGORIES if c in acc} | {t: a for t, a in acc.items() if t not in CATEGORIES}
    return ordered | {"overall": float(np.mean(list(acc.values())))}


def _check(resolution: int, images_per_prompt: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
        raise ValueError(f"resolution must be an int ≥ 16 px (the shapes renderer's minimum), got {resolution!r}")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")


def _repeat(items: list[PromptItem], n: int) -> list[PromptItem]:
    return [it for it in items for _ in range(n)]


def judge_floor(resolution: int = 32, images_per_prompt: int = 2, seed: int = 0) -> dict[str, dict[str, float]]:
    """The judge's accuracy on object-free inputs, for every prompt of the shapes evaluation set.

    Args:
        resolution: image side in pixels (the project trains and evaluates at 32).
        images_per_prompt: images of each kind judged per prompt (150 prompts: 300 images per kind at 2).
        seed: seed of the inputs (kind ``i`` draws from ``default_rng([seed, i])``).

    Returns:
        ``{kind: {category: accuracy, ..., "overall": mean over categories}}`` for every kind of
        :data:`INPUT_KINDS`; accuracies in [0, 1]. About 5 ms per image on one core at 32 px.

    Raises:
        ValueError: ``resolution`` < 16 or ``images_per_prompt`` < 1.
    """
    _check(resolution, images_per_prompt)
    items = _repeat(load_prompt_set("shapes", None), images_per_prompt)
    out: dict[str, dict[str, float]] = {}
    for i, kind in enumerate(INPUT_KINDS):
        rng = np.random.default_rng([seed, i])
        out[kind] = judge_accuracy(items, [floor_image(kind, resolution, rng) for _ in items])
    return out


def _renders(resolution: int, transform: Callable[[np.ndarray, int], np.ndarray]) -> tuple[list[PromptItem], list]:
    items = load_prompt_set("shapes", None)
    return items, [transform(render(it.metadata["scene"], resolution), k) for k, it in enumerate(items)]


def clean_accuracy(resolution: int = 32) -> dict[str, float]:
    """The judge's accuracy on a clean render of each prompt's reference scene (150 images).

    Returns:
        ``{category: accuracy, ..., "overall": ...}``.
    """
    _check(resolution, 1)
    items, images = _renders(resolution, lambda img, _k: img)
    return judge_accuracy(items, images)


def degraded_accuracy(
    resolution: int = 32,
    degradation: tuple[str, float] | None = None,
    cfg: DegradationConfig | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The judge's accuracy on degraded renders of each prompt's reference scene (150 images).

    Args:
        resolution: image side in pixels.
        degradation: ``(kind, strength)`` applied to every image (:func:`miroflow.data.shapes.apply_degradation`:
            blur sigma px, noise std, contrast factor, JPEG quality); ``None`` draws the dataset's own
            random mix from ``cfg`` instead (:func:`miroflow.data.shapes.degrade`; default
            :class:`~miroflow.config.DegradationConfig`, as in ``params.yaml``).
        cfg: the degradation mix when ``degradation`` is None.
        seed: seed of the noise patterns / the random mix.

    Returns:
        ``{category: accuracy, ..., "overall": ...}``.
    """
    _check(resolution, 1)
    mix = cfg or DegradationConfig.model_validate({})

    def transform(img: np.ndarray, k: int) -> np.ndarray:
        if degradation is not None:
            return apply_degradation(img, degradation[0], degradation[1], seed=seed * 100_003 + k)
        return degrade(img, np.random.default_rng([seed, k]), mix, resolution)[0]

    items, images = _renders(resolution, transform)
    return judge_accuracy(items, images)
