"""Test-time scaling by best-of-N selection (the paper's "one MIRO sample vs the baseline's best of 128").

For every prompt, ``N_max = max(sweep.best_of_n)`` candidates are generated **once** (image ``j``
of prompt ``i`` from seed :func:`miroflow.evaluate.sample_seed` ``(eval.seed, i, j)``, so the
candidates are exactly the images the evaluate stage would make). For each ``N`` of the grid
the image with the highest ``select_by`` reward among the **first N** candidates is selected, so
the candidate sets are nested: on fixed seeds the selected reward of every prompt, hence its
mean, never decreases as ``N`` grows. Every reward (and judge accuracy) is then reported for the
selected images — select by one, report all — which shows whether optimising one reward at
test time helps or hurts the others.

Compute accounting (per selected image, i.e. per prompt):

* ``denoiser_evals_per_image = N × steps × (2 if ω > 0 else 1)`` — rows through the denoiser
  (guidance batches the ``s⁺`` and ``s⁻`` branches into one forward of 2B rows, which is still
  two evaluations per image);
* ``selection_reward_calls_per_image = N`` — calls of the ``select_by`` reward model needed to select;
* ``reward_calls_per_image = N × R`` — reward calls made here to report all R rewards of every
  candidate (evaluation cost, not part of the method's cost).

Outputs of :func:`run_tts` (under ``out_uri``, default ``<root>/<sweep.output>/<run name>/tts``)::

    tts.json          the best_of_n dict + setup (checkpoint, prompt set, steps, ω, seed, model)
    tts.csv           one row per N: compute columns, every reward's mean, accuracy, overall
    candidates.jsonl  one line per candidate (prompt/sample index, seed, tag, rewards, verdict),
                      so another select_by can be evaluated without regenerating
    selected.png      the selected image of the first prompts (rows) for each N (columns)
    tts.png           mean of every metric of the selected images vs N
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from miroflow.config import Params
from miroflow.evaluate import ensure_pipeline, generate, judge_images, sample_seed, score_images
from miroflow.prompts import PromptItem, load_prompt_set
from miroflow.storage import Storage, join_uri
from miroflow.tracking import NullTracker, Tracker
from miroflow.util import json_safe

if TYPE_CHECKING:  # pragma: no cover
    from miroflow.pipeline import MiroPipeline

__all__ = [
    "Candidates",
    "best_of_n",
    "compute_cost",
    "judge_arrays",
    "generate_candidates",
    "run_tts",
    "tts_with_images",
    "tts_csv",
]

log = logging.getLogger(__name__)

#: How many prompts the ``selected.png`` grid shows.
GRID_PROMPTS = 8


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
        ``judge_score``, ``overall``, ``accuracy_by_tag`` and the compute numbers), and with images
        ``images``: ``np.ndarray [len(ns), P, H, W, 3]`` (not JSON; dropped by :func:`run_tts`).

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

    key = np.where(np.isfinite(arrs[select_by]), arrs[select_by], -np.inf)
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
        idx = np.argmax(key[:, :n], axis=1)  # first maximum: ties keep the earlier candidate
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


# --------------------------------------------------------------------------- generation
@dataclass
class Candidates:
    """``N_max`` candidates per prompt with their scores.

    Attributes:
        items: the P prompts.
        seeds: ``[P, Nmax]`` int64 seed of each candidate.
        images: ``[P, Nmax, H, W, 3]`` uint8.
        scores: ``{reward: [P, Nmax]}`` normalised values (NaN = not scorable).
        judge: ``{"correct", "judge_score"}`` ``[P, Nmax]`` float (NaN = not judged).
    """

    items: list[PromptItem]
    seeds: np.ndarray
    images: np.ndarray
    scores: dict[str, np.ndarray]
    judge: dict[str, np.ndarray]


def generate_candidates(
    pipeline: "MiroPipeline",
    items: Sequence[PromptItem],
    n_max: int,
    reward_names: Sequence[str],
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    reward_targets: Mapping[str, float | None] | None = None,
    negative_reward_targets: Mapping[str, float | None] | None = None,
    batch_size: int = 64,
    score_config: Any = None,
) -> Candidates:
    """Generate, score and judge ``n_max`` candidates of every prompt (seeds ``sample_seed(seed, i, j)``).

    Work proceeds in chunks of ``batch_size`` images (prompt-major order), so memory stays bounded
    by the images themselves (``P·Nmax·H·W·3`` bytes).
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    p = len(items)
    jobs = [(i, j) for i in range(p) for j in range(n_max)]
    res = pipeline.resolution
    images = np.zeros((p * n_max, res, res, 3), dtype=np.uint8)
    seeds = np.array([sample_seed(seed, i, j) for i, j in jobs], dtype=np.int64)
    scores = {name: np.full(p * n_max, np.nan) for name in reward_names}
    verdicts: list[dict[str, Any] | None] = []
    chunk = max(int(batch_size), 1)
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        prompts = [items[i].prompt for i, _ in part]
        imgs = generate(
            pipeline,
            prompts,
            [int(s) for s in seeds[start : start + len(part)]],
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            reward_targets=reward_targets,
            negative_reward_targets=negative_reward_targets,
            batch_size=chunk,
        )
        images[start : start + len(part)] = imgs
        sc = score_images(imgs, prompts, list(reward_names), score_config=score_config, batch_size=chunk)
        for name in reward_names:
            scores[name][start : start + len(part)] = sc[name]
        verdicts.extend(judge_images(imgs, prompts))
    return Candidates(
        items=list(items),
        seeds=seeds.reshape(p, n_max),
        images=images.reshape(p, n_max, res, res, 3),
        scores={k: v.reshape(p, n_max) for k, v in scores.items()},
        judge=judge_arrays(verdicts, p, n_max),
    )


# --------------------------------------------------------------------------- outputs
def tts_csv(result: Mapping[str, Any]) -> str:
    """One CSV row per N: ``n``, the compute columns, every reward's mean, then judge metrics."""
    extra = [k for k in ("accuracy", "overall", "judge_score") if k in result["curves"]]
    compute_cols = ["denoiser_evals_per_image", "selection_reward_calls_per_image", "reward_calls_per_image"]
    header = ["n", *compute_cols, *result["rewards"], *extra]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for k, n in enumerate(result["ns"]):
        row: list[Any] = [n, *(result["compute"][c][k] for c in compute_cols)]
        for name in [*result["rewards"], *extra]:
            v = result["curves"][name][k]
            row.append("" if v is None or not math.isfinite(float(v)) else f"{float(v):.6g}")
        w.writerow(row)
    return buf.getvalue()


def tts_with_images(
    params: Params,
    pipeline: "MiroPipeline | None" = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
    out_uri: str | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`run_tts` that also returns the selected images ``[len(ns), P, H, W, 3]`` uint8."""
    from miroflow import plots
    from miroflow.rewards import reward_spec
    from miroflow.storage import from_config

    ev, sw = params.eval, params.sweep
    st = storage or from_config(params.storage)
    reward_names = list(ev.rewards if ev.rewards is not None else params.score.rewards)
    if sw.select_by not in reward_names:
        reward_spec(sw.select_by)  # an unknown name fails here, listing the valid ones
        reward_names.append(sw.select_by)
    if not sw.best_of_n:
        raise ValueError("sweep.best_of_n: empty N grid")
    bad = [n for n in sw.best_of_n if n < 1]
    if bad:
        raise ValueError(f"sweep.best_of_n: N must be >= 1, got {bad}")
    n_max = max(sw.best_of_n)
    pipeline, checkpoint = ensure_pipeline(params, st, pipeline)
    spec = pipeline.spec
    run_label = spec.run_name or params.train.run_name
    out = out_uri or join_uri(params.storage.root, sw.output, run_label, "tts")
    items = load_prompt_set(ev.prompt_set, ev.num_prompts, storage=st)
    log.info("tts: %d prompts x %d candidates, select by %s -> %s", len(items), n_max, sw.select_by, out)
    cands = generate_candidates(
        pipeline,
        items,
        n_max,
        reward_names,
        seed=ev.seed,
        steps=ev.steps,
        guidance_scale=ev.guidance_scale,
        reward_targets=ev.reward_targets,
        negative_reward_targets=ev.negative_reward_targets,
        batch_size=ev.batch_size,
        score_config=params.score,
    )
    res = best_of_n(
        cands.images,
        cands.scores,
        sw.select_by,
        sw.best_of_n,
        judge=cands.judge,
        tags=[it.tag for it in items],
        steps=ev.steps,
        guidance_scale=ev.guidance_scale,
    )
    selected_images: np.ndarray = res.pop("images")
    res.update(
        {
            "checkpoint": checkpoint,
            "prompt_set": ev.prompt_set,
            "seed": ev.seed,
            "reward_targets": pipeline.resolve_reward_targets(ev.reward_targets, 1.0, "eval.reward_targets"),
            "negative_reward_targets": pipeline.resolve_reward_targets(
                ev.negative_reward_targets, 0.0, "eval.negative_reward_targets"
            ),
            "output": out,
            "model": {"run_name": spec.run_name, "step": spec.step, "reward_names": pipeline.reward_names},
        }
    )
    res = json_safe(res)

    # outputs
    lines = []
    for i, it in enumerate(items):
        for j in range(n_max):
            row: dict[str, Any] = {
                "prompt_index": i,
                "sample_index": j,
                "seed": int(cands.seeds[i, j]),
                "tag": it.tag,
                "prompt": it.prompt,
                "correct": None
                if not math.isfinite(cands.judge["correct"][i, j])
                else bool(cands.judge["correct"][i, j]),
                "judge_score": json_safe(cands.judge["judge_score"][i, j]),
            }
            row.update({name: json_safe(cands.scores[name][i, j]) for name in reward_names})
            lines.append(json.dumps(row))
    st.write_bytes(join_uri(out, "candidates.jsonl"), ("\n".join(lines) + "\n").encode())
    st.write_bytes(join_uri(out, "tts.csv"), tts_csv(res).encode())
    k = min(GRID_PROMPTS, len(items))
    grid = np.transpose(selected_images[:, :k], (1, 0, 2, 3, 4))  # [k prompts, len(ns), H, W, 3]
    fig_grid = plots.image_grid(
        grid, [it.prompt for it in items[:k]], [f"N={n}" for n in res["ns"]], title=f"best-of-N by {sw.select_by}"
    )
    st.write_bytes(join_uri(out, "selected.png"), plots.figure_png(fig_grid))
    series = {name: res["curves"][name] for name in res["curves"]}
    fig_curve = plots.tradeoff(
        res["ns"],
        series,
        xlabel="N (candidates per prompt)",
        title=f"best-of-N by {sw.select_by}: every metric of the selected images",
    )
    fig_curve.axes[0].set_xscale("log", base=2)
    st.write_bytes(join_uri(out, "tts.png"), plots.figure_png(fig_curve))
    st.write_bytes(join_uri(out, "tts.json"), (json.dumps(res, indent=2) + "\n").encode())

    tracker = tracker or NullTracker()
    tracker.set_tags({"tts.select_by": sw.select_by, "tts.output": out})
    for point in res["points"]:
        metrics = {f"tts/reward/{name}": s["mean"] for name, s in point["rewards"].items() if s["mean"] is not None}
        for key in ("accuracy", "overall", "judge_score"):
            if point.get(key) is not None:
                metrics[f"tts/{key}"] = point[key]
        metrics["tts/denoiser_evals_per_image"] = point["denoiser_evals_per_image"]
        tracker.log_metrics(metrics, step=point["n"])
    tracker.log_dict(res, "tts/tts.json")
    tracker.log_figure(fig_curve, "tts/tts.png")
    tracker.log_figure(fig_grid, "tts/selected.png")
    return res, selected_images


def run_tts(
    params: Params,
    pipeline: "MiroPipeline | None" = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
    out_uri: str | None = None,
) -> dict[str, Any]:
    """Best-of-N test-time scaling of one model on ``eval.prompt_set``.

    Generates ``max(sweep.best_of_n)`` candidates per prompt once (``eval.steps``,
    ``eval.guidance_scale``, ``eval.reward_targets``, seeds from ``eval.seed``), scores them with
    ``eval.rewards`` (else ``score.rewards``; ``sweep.select_by`` is added if missing), judges
    them, and selects by ``sweep.select_by`` for every N of ``sweep.best_of_n``.

    Args:
        params: the whole config.
        pipeline: a loaded pipeline; ``None`` loads :func:`miroflow.evaluate.resolve_checkpoint`.
        storage: defaults to one built from ``params.storage``.
        tracker: optional; gets ``tts/reward/<name>``, ``tts/accuracy``, ``tts/overall``,
            ``tts/denoiser_evals_per_image`` at ``step = N``, ``tts/tts.json`` and the figures.
        out_uri: output prefix; default ``<root>/<sweep.output>/<run name>/tts``.

    Returns:
        The JSON-safe :func:`best_of_n` dict (no images) plus ``checkpoint``, ``prompt_set``,
        ``seed``, ``reward_targets``, ``negative_reward_targets``, ``output`` and ``model``
        (also written as ``tts.json``).

    Raises:
        RewardNotFound: ``sweep.select_by`` is not a registered reward (lists the valid ones).
    """
    return tts_with_images(params, pipeline=pipeline, storage=storage, tracker=tracker, out_uri=out_uri)[0]
