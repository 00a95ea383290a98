"""Pure best-of-N selection on candidate score arrays (no models, no I/O), for :mod:`miroflow.tts`.

:func:`best_of_n` selects, for every N of a grid, the best of the first N candidates of each
prompt by one reward and reports every metric of the selected images; :func:`compute_cost` is the
compute accounting of one best-of-N image (see :mod:`miroflow.tts`) and :func:`judge_arrays` turns
judge verdicts into the arrays :func:`best_of_n` takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["best_of_n", "compute_cost", "judge_arrays"]


# --------------------------------------------------------------------------- pure selection
def compute_cost(n: int, steps: int, guidance_scale: float, num_rewards: int) -> dict[str, int]:
    """Compute of one best-of-``n`` image.

    Returns:
        ``{"denoiser_evals_per_image": n·steps·(2 if ω>0 else 1), "selection_reward_calls_per_image": n,
        "reward_calls_per_image": n·num_rewards}``.
    """
    if n < 1 or steps < 1:
        raise ValueError(f"compute_cost: n and steps must be >= 1, got n={n}, steps={steps}")
    branches = 2 if float(guidance_scale) > 0 else 1
    return {
        "denoiser_evals_per_image": int(n) * int(steps) * branches,
        "selection_reward_calls_per_image": int(n),
        "reward_calls_per_image": int(n) * int(num_rewards),
    }


def judge_arrays(verdicts: Sequence[Mapping[str, Any] | None], n_prompts: int, n_max: int) -> dict[str, np.ndarray]:
    """Judge verdicts (:func:`miroflow.evaluate.judge_images`, prompt-major order) -> arrays.

    Returns:
        ``{"correct": [P, Nmax] float64 (1/0, NaN = not judged), "judge_score": [P, Nmax] float64}``.
    """
    if len(verdicts) != n_prompts * n_max:
        raise ValueError(f"judge_arrays: {len(verdicts)} verdicts for {n_prompts} prompts x {n_max} candidates")
    correct = np.full(n_prompts * n_max, np.nan)
    score = np.full(n_prompts * n_max, np.nan)
    for k, v in enumerate(verdicts):
        if v is not None:
            correct[k] = 1.0 if v["correct"] else 0.0
            score[k] = float(v["judge_score"]) if v.get("judge_score") is not None else np.nan
    return {"correct": correct.reshape(n_prompts, n_max), "judge_score": score.reshape(n_prompts, n_max)}


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    finite = values[np.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "n": int(finite.size),
    }


def _check_2d(name: str, arr: Any, shape: tuple[int, int] | None) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"best_of_n: {name} must have shape [P, Nmax], got {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"best_of_n: {name} has shape {a.shape}, expected {shape} like the other arrays")
    return a


def best_of_n(
    images_or_scores: np.ndarray | Mapping[str, np.ndarray] | None,
    scores: Mapping[str, np.ndarray] | None = None,
    select_by: str | None = None,
    ns: Sequence[int] | None = None,
    *,
    judge: Mapping[str, np.ndarray] | None = None,
    tags: Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 0.0,
) -> dict[str, Any]:
    """Best-of-N selection on nested candidate sets, reporting every metric of the selected images.

    Call as ``best_of_n(images, scores, select_by, ns)`` (also returns the selected images) or
    ``best_of_n(scores, select_by=..., ns=...)`` (scores only).

    Args:
        images_or_scores: candidates ``[P, Nmax, H, W, 3]`` uint8, or the ``scores`` dict (then
            ``scores`` must be ``None``), or ``None``.
        scores: ``{reward name: [P, Nmax]}`` normalised reward of candidate ``j`` of prompt ``i``
            (NaN = not scorable; it is never selected while a finite candidate exists).
        select_by: the reward to maximise (a key of ``scores``).
        ns: the N grid (each ``1 ≤ N ≤ Nmax``); sorted and de-duplicated in the result.
        judge: optional ``{"correct": [P, Nmax] (1/0/NaN), "judge_score": [P, Nmax]}``
            (:func:`judge_arrays`).
        tags: optional category of each prompt (length P) for GenEval-style ``overall``
            (mean over categories of the per-category accuracy).
        steps / guidance_scale: sampling setup, for the compute accounting.

    Returns:
        ``select_by``, ``ns``, ``n_max``, ``n_prompts``, ``rewards`` (names),
        ``curves`` {metric: [mean of the selected images per N]} for every reward, plus
        ``accuracy``/``judge_score`` (with ``judge``) and ``overall`` (with ``judge`` and ``tags``),
        ``std`` {reward: [std per N]}, ``selected`` [len(ns)][P] candidate indices,
        ``compute`` {``steps``, ``guidance_scale``, ``branches``, and per N lists
        ``denoiser_evals_per_image``, ``selection_reward_calls_per_image``, ``reward_calls_per_image``},
        ``points`` (one dict per N: ``n``, ``rewards`` {name: {mean, std, n}}, ``accuracy``,
        ``judge_score``, ``overall``, ``accuracy_by_tag``, ``n_by_tag`` (judged prompts per category) and the
        compute numbers), and with images
        ``images``: ``np.ndarray [len(ns), P, H, W, 3]`` (not JSON; dropped by :func:`~miroflow.tts.run_tts`).

    Raises:
        ValueError: ``select_by`` not among the rewards (lists them), N outside ``[1, Nmax]``
            (names Nmax), empty ``ns``/``scores``, or inconsistent shapes.
    """
    images: np.ndarray | None
    if isinstance(images_or_scores, Mapping):
        if scores is not None:
            raise ValueError("best_of_n: pass the scores dict once (first argument or `scores`)")
        scores, images = images_or_scores, None
    else:
        images = None if images_or_scores is None else np.asarray(images_or_scores)
    if not scores:
        raise ValueError("best_of_n: no reward scores given")
    names = list(scores)
    if select_by is None or select_by not in scores:
        raise ValueError(f"best_of_n: select_by={select_by!r} is not among the scored rewards: {', '.join(names)}")
    first = _check_2d(names[0], scores[names[0]], None)
    shape: tuple[int, int] = (int(first.shape[0]), int(first.shape[1]))
    arrs = {n: _check_2d(n, scores[n], shape) for n in names}
    p, n_max = shape
    if p < 1 or n_max < 1:
        raise ValueError(f"best_of_n: need at least one prompt and one candidate, got shape {shape}")
    if not ns:
        raise ValueError("best_of_n: empty N grid (ns)")
    grid: list[int] = []
    for n in ns:
        if isinstance(n, bool) or int(n) != n:
            raise ValueError(f"best_of_n: N must be an integer, got {n!r}")
        if not 1 <= int(n) <= n_max:
            raise ValueError(f"best_of_n: N={n} is outside [1, Nmax={n_max}] (only {n_max} candidates per prompt)")
        grid.append(int(n))
    grid = sorted(set(grid))
    if images is not None and (images.ndim != 5 or images.shape[:2] != shape or images.shape[-1] != 3):
        raise ValueError(f"best_of_n: images must have shape [P={p}, Nmax={n_max}, H, W, 3], got {images.shape}")
    jud: dict[str, np.ndarray] = {}
    if judge is not None:
        for key in ("correct", "judge_score"):
            if key in judge:
                jud[key] = _check_2d(f"judge[{key!r}]", judge[key], shape)
    if tags is not None and len(tags) != p:
        raise ValueError(f"best_of_n: {len(tags)} tags for {p} prompts")

    sel_key = np.where(np.isfinite(arrs[select_by]), arrs[select_by], -np.inf)
    rows = np.arange(p)
    curves: dict[str, list[float | None]] = {n: [] for n in names}
    stds: dict[str, list[float | None]] = {n: [] for n in names}
    if "correct" in jud:
        curves["accuracy"] = []
    if "judge_score" in jud:
        curves["judge_score"] = []
    if "correct" in jud and tags is not None:
        curves["overall"] = []
    points: list[dict[str, Any]] = []
    selected: list[list[int]] = []
    costs: list[dict[str, int]] = []
    chosen_images: list[np.ndarray] = []
    for n in grid:
        idx = np.argmax(sel_key[:, :n], axis=1)  # first maximum: ties keep the earlier candidate
        selected.append([int(i) for i in idx])
        cost = compute_cost(n, steps, guidance_scale, len(names))
        costs.append(cost)
        point: dict[str, Any] = {"n": n, "rewards": {}, **cost}
        for name in names:
            st = _stats(arrs[name][rows, idx])
            point["rewards"][name] = st
            curves[name].append(st["mean"])
            stds[name].append(st["std"])
        if "correct" in jud:
            sel = jud["correct"][rows, idx]
            acc = _stats(sel)["mean"]
            point["accuracy"] = acc
            curves["accuracy"].append(acc)
            if tags is not None:
                by_tag: dict[str, list[float]] = {}
                for t, v in zip(tags, sel):
                    if math.isfinite(v):
                        by_tag.setdefault(str(t), []).append(float(v))
                acc_tag = {t: float(np.mean(v)) for t, v in by_tag.items()}
                overall = float(np.mean(list(acc_tag.values()))) if acc_tag else None
                point["accuracy_by_tag"] = acc_tag
                point["n_by_tag"] = {t: len(v) for t, v in by_tag.items()}  # judged prompts: the monitor's noise
                point["overall"] = overall
                curves["overall"].append(overall)
        if "judge_score" in jud:
            js = _stats(jud["judge_score"][rows, idx])["mean"]
            point["judge_score"] = js
            curves["judge_score"].append(js)
        points.append(point)
        if images is not None:
            chosen_images.append(images[rows, idx])
    out: dict[str, Any] = {
        "select_by": select_by,
        "ns": grid,
        "n_max": n_max,
        "n_prompts": p,
        "rewards": names,
        "curves": curves,
        "std": stds,
        "selected": selected,
        "compute": {
            "steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "branches": 2 if float(guidance_scale) > 0 else 1,
            **{k: [c[k] for c in costs] for k in costs[0]},
        },
        "points": points,
    }
    if images is not None:
        out["images"] = np.stack(chosen_images)
    return out
