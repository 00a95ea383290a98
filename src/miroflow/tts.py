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

Outputs of :func:`run_tts` (under ``out_uri``, default ``<root>/<sweep.output>/<run name>-<hash>/tts``)::

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
from miroflow.content_keys import addressed
from miroflow.evaluate import ensure_pipeline, generate, judge_images, sample_seed, score_images
from miroflow.prompts import PromptItem, load_prompt_set
from miroflow.storage import Storage, join_uri
from miroflow.tracking import NullTracker, Tracker
from miroflow.tts_stats import best_of_n, compute_cost, judge_arrays
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
    out = out_uri or join_uri(params.storage.root, sw.output, addressed(run_label, params, "sweep"), "tts")
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
        out_uri: output prefix; default ``<root>/<sweep.output>/<run name>-<hash>/tts``.

    Returns:
        The JSON-safe :func:`best_of_n` dict (no images) plus ``checkpoint``, ``prompt_set``,
        ``seed``, ``reward_targets``, ``negative_reward_targets``, ``output`` and ``model``
        (also written as ``tts.json``).

    Raises:
        RewardNotFound: ``sweep.select_by`` is not a registered reward (lists the valid ones).
    """
    return tts_with_images(params, pipeline=pipeline, storage=storage, tracker=tracker, out_uri=out_uri)[0]
