"""The sweep stage: guidance, reward-target and best-of-N grids of one model, one MLflow child run per point.

One parent MLflow run (``sweep-<run name>``, the whole config as params) holds one child run
(tag ``mlflow.parentRunId``) per point:

* **guidance** — each ω of ``sweep.guidance_scales`` (targets from ``eval.reward_targets``);
* **target** — ``sweep.target_reward`` at each of ``sweep.target_values``, every other reward
  at 1 (ω = ``eval.guidance_scale``); skipped for a baseline (no rewards) or ``target_reward: null``;
* **best_of_n** — each N of ``sweep.best_of_n``, selected by ``sweep.select_by`` from one set of
  ``max(N)`` candidates per prompt (:mod:`miroflow.tts`).

Guidance and target points are evaluated with :func:`miroflow.evaluate.run_evaluate` (generation +
rewards + judge, GenEval layout) on ``eval.prompt_set`` limited to ``eval.num_prompts``, with the
same seeds at every point (so columns of an image grid differ only by the swept value). Each child
run gets ``eval/<category>``, ``eval/overall``, ``eval/reward/<name>`` (best-of-N children also
``tts/denoiser_evals_per_image``), its params (``sweep.kind``, the swept value) and tags.

Outputs under ``<root>/<sweep.output>/<run name>-<hash>/``::

    sweep.json                 every point's metrics + setup (also an artifact of the parent run)
    points/<kind>-<value>/     each point's evaluate output (results.jsonl, summary.json, images)
    best_of_n/                 the best-of-N outputs (:func:`miroflow.tts.run_tts`'s files; a standalone
                               ``run_tts`` writes to ``tts/`` instead, so the two never overwrite each other)
    plots/*.png                trade-off curves, TTS curves, radar, image grids (also parent artifacts)
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from miroflow import hacking, plots
from miroflow.config import Params
from miroflow.content_keys import addressed
from miroflow.evaluate import resolve_checkpoint, run_evaluate
from miroflow.pipeline import MiroPipeline, load_pipeline
from miroflow.prompts import load_prompt_set
from miroflow.results import eval_metrics
from miroflow.storage import Storage, from_config, join_uri
from miroflow.tracking import NullTracker, Tracker
from miroflow.tts import tts_with_images
from miroflow.util import json_safe, resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["SweepPoint", "plan_points", "run_sweep"]

log = logging.getLogger(__name__)

#: Prompts shown per image grid (rows).
GRID_PROMPTS = 6


class SweepPoint(dict):  # type: ignore[type-arg]
    """One point of the sweep: ``kind`` (guidance | target | best_of_n), ``name``, ``x`` (the swept
    value), ``guidance_scale``, ``reward_targets`` (overrides of ``eval.reward_targets``) and ``n``
    (best-of-N only). A plain dict (JSON-safe)."""


def _fmt(v: float) -> str:
    return f"{float(v):g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def plan_points(params: Params, model_rewards: Sequence[str]) -> tuple[list[SweepPoint], list[str]]:
    """The sweep's points in order (guidance, target, best_of_n) and notes on skipped grids.

    Raises:
        ValueError: ``sweep.target_reward`` is not a reward of this MIRO model (lists them), or a
            target value outside [0, 1].
    """
    sw, ev = params.sweep, params.eval
    points: list[SweepPoint] = []
    notes: list[str] = []
    for w in sw.guidance_scales:
        points.append(
            SweepPoint(
                kind="guidance",
                name=f"guidance/omega={_fmt(w)}",
                x=float(w),
                guidance_scale=float(w),
                reward_targets=dict(ev.reward_targets),
            )
        )
    if sw.target_reward is None:
        notes.append("target grid skipped: sweep.target_reward is null")
    elif not model_rewards:
        notes.append(f"target grid skipped: the model has no rewards (baseline), cannot target {sw.target_reward!r}")
    else:
        if sw.target_reward not in model_rewards:
            raise ValueError(
                f"sweep.target_reward={sw.target_reward!r} is not a reward of this model; its rewards are: {', '.join(model_rewards)}"
            )
        for v in sw.target_values:
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"sweep.target_values: {v} is outside [0, 1]")
            # the swept reward at v, every other reward at 1 (the pipeline's default positive target)
            points.append(
                SweepPoint(
                    kind="target",
                    name=f"target/{sw.target_reward}={_fmt(v)}",
                    x=float(v),
                    guidance_scale=float(ev.guidance_scale),
                    reward_targets={sw.target_reward: float(v)},
                )
            )
    for n in sorted(set(sw.best_of_n)):
        points.append(
            SweepPoint(
                kind="best_of_n",
                name=f"best_of_n/n={n}",
                x=float(n),
                n=int(n),
                guidance_scale=float(ev.guidance_scale),
                reward_targets=dict(ev.reward_targets),
            )
        )
    if not sw.best_of_n:
        notes.append("best-of-N grid skipped: sweep.best_of_n is empty")
    return points, notes


def _read_png(st: Storage, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(st.read_bytes(uri))).convert("RGB"))


def run_sweep(
    params: Params,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    out_uri: str | None = None,
    tracker: Tracker | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Run the guidance, reward-target and best-of-N grids of ``params.sweep`` on one model.

    Args:
        params: the whole config (``sweep``; ``eval`` for prompt set, steps, seeds, batch size and
            the fixed ω/targets of the other grids; ``tracking``; ``storage``).
        pipeline: a loaded pipeline; ``None`` loads :func:`miroflow.evaluate.resolve_checkpoint`.
        storage: defaults to one built from ``params.storage``.
        out_uri: output prefix; default ``<root>/<sweep.output>/<run name>-<hash>``.
        tracker: the parent run (one child run per point); default records nothing.
        checkpoint: the URI ``pipeline`` was loaded from (recorded; default ``eval.checkpoint``).

    Returns:
        The ``sweep.json`` dict: ``run_name``, ``output``, ``checkpoint``, ``prompt_set``,
        ``n_prompts``, ``parent_run_id`` (``None`` with tracking off), ``points`` (one dict per point:
        ``kind``, ``name``, ``x``, ``guidance_scale``, ``reward_targets``, ``n``, ``run_id``, ``output``,
        ``accuracy``, ``overall``, ``rewards`` {name: mean}, compute numbers for best-of-N),
        ``tts`` (the :func:`miroflow.tts.run_tts` dict, or ``None``), ``plots`` {name: uri}, ``notes``.
    """

    st = storage or from_config(params.storage)
    ev, sw = params.eval, params.sweep
    parent = tracker or NullTracker()
    if pipeline is None:
        checkpoint = resolve_checkpoint(params, st)
        pipeline = load_pipeline(checkpoint, storage=st, device=str(resolve_device()))
    else:
        checkpoint = checkpoint or ev.checkpoint
    pipeline.set_progress_bar_config(disable=True)
    run_label = pipeline.spec.run_name or params.train.run_name
    out = out_uri or join_uri(params.storage.root, sw.output, addressed(run_label, params, "sweep"))
    points, notes = plan_points(params, pipeline.reward_names)
    prompts_shown = [it.prompt for it in load_prompt_set(ev.prompt_set, ev.num_prompts, storage=st)[:GRID_PROMPTS]]
    for note in notes:
        log.info("sweep: %s", note)

    results: list[dict[str, Any]] = []
    grids: dict[str, tuple[list[np.ndarray], list[str]]] = {}  # kind -> (columns [K, H, W, 3], labels)
    tts: dict[str, Any] | None = None
    plot_uris: dict[str, str] = {}
    parent_id = parent.run_id
    # ---- guidance and target points: one evaluate each
    for pt in (p for p in points if p["kind"] != "best_of_n"):
        ev_pt = ev.model_copy(update={"guidance_scale": pt["guidance_scale"], "reward_targets": pt["reward_targets"]})
        p_pt = params.model_copy(update={"eval": ev_pt})
        point_out = join_uri(out, "points", _slug(pt["name"].replace("/", "-")))
        child_params = {
            "sweep.kind": pt["kind"],
            "sweep.point": pt["name"],
            "guidance_scale": pt["guidance_scale"],
            "reward_targets": json.dumps(pt["reward_targets"], sort_keys=True),
        }
        with parent.child_run(pt["name"], params=child_params, tags={"sweep.kind": pt["kind"]}) as child:
            summary = run_evaluate(p_pt, pipeline=pipeline, storage=st, out_uri=point_out, tracker=child)
            run_id = child.run_id
        results.append(
            {
                **pt,
                "run_id": run_id,
                "output": point_out,
                "accuracy": summary["accuracy"],
                "overall": summary["overall"],
                "rewards": {k: v["mean"] for k, v in summary["rewards"].items()},
                "reward_stats": summary["rewards"],  # {name: {mean, std, n}}: the hacking monitor's noise
                "n_judged": summary["n_judged"],
                "reward_targets_resolved": summary["reward_targets"],
            }
        )
        k = min(GRID_PROMPTS, summary["n_prompts"])
        col = [_read_png(st, join_uri(point_out, f"{i:05d}", "samples", "0000.png")) for i in range(k)]
        label = f"ω={_fmt(pt['x'])}" if pt["kind"] == "guidance" else f"{sw.target_reward}={_fmt(pt['x'])}"
        grids.setdefault(pt["kind"], ([], []))[0].append(np.stack(col))
        grids[pt["kind"]][1].append(label)

    # ---- best-of-N: candidates once, one child per N
    if sw.best_of_n:
        tts, selected = tts_with_images(params, pipeline=pipeline, storage=st, out_uri=join_uri(out, "best_of_n"))
        tts["checkpoint"] = checkpoint
        for k_n, point in enumerate(tts["points"]):
            n = point["n"]
            name = f"best_of_n/n={n}"
            metrics = eval_metrics(
                point.get("accuracy_by_tag", {}),
                point.get("overall"),
                {r: s["mean"] for r, s in point["rewards"].items()},
            )
            metrics["tts/denoiser_evals_per_image"] = float(point["denoiser_evals_per_image"])
            metrics["tts/reward_calls_per_image"] = float(point["reward_calls_per_image"])
            child_params = {
                "sweep.kind": "best_of_n",
                "sweep.point": name,
                "n": n,
                "select_by": sw.select_by,
                "guidance_scale": ev.guidance_scale,
            }
            with parent.child_run(name, params=child_params, tags={"sweep.kind": "best_of_n"}) as child:
                child.log_metrics(metrics, step=0)
                child.log_dict(point, "eval/best_of_n.json")
                run_id = child.run_id
            results.append(
                {
                    "kind": "best_of_n",
                    "name": name,
                    "x": float(n),
                    "n": n,
                    "guidance_scale": float(ev.guidance_scale),
                    "reward_targets": dict(ev.reward_targets),
                    "run_id": run_id,
                    "output": tts["output"],
                    "accuracy": point.get("accuracy_by_tag", {}),
                    "overall": point.get("overall"),
                    "rewards": {r: s["mean"] for r, s in point["rewards"].items()},
                    "denoiser_evals_per_image": point["denoiser_evals_per_image"],
                    "selection_reward_calls_per_image": point["selection_reward_calls_per_image"],
                    "reward_calls_per_image": point["reward_calls_per_image"],
                }
            )
            kk = min(GRID_PROMPTS, selected.shape[1])
            grids.setdefault("best_of_n", ([], []))[0].append(selected[k_n, :kk])
            grids["best_of_n"][1].append(f"N={n}")

    # ---- plots: to the sweep's output dir and as artifacts of the parent run
    figures = _figures(results, tts, grids, prompts_shown, run_label, sw.target_reward, sw.select_by)
    hack_tags, hack_fig = _hacking(results, notes, run_label, sw.target_reward, tts)
    if hack_fig is not None:
        figures["hacking.png"] = hack_fig
    for fname, fig in figures.items():
        uri = join_uri(out, "plots", fname)
        st.write_bytes(uri, plots.figure_png(fig))
        plot_uris[fname] = uri
        parent.log_figure(fig, f"plots/{fname}")
    doc: dict[str, Any] = {
        "run_name": run_label,
        "output": out,
        "checkpoint": checkpoint,
        "prompt_set": ev.prompt_set,
        "n_prompts": ev.num_prompts,
        "steps": ev.steps,
        "seed": ev.seed,
        "parent_run_id": parent_id,
        "points": results,
        "tts": tts,
        "plots": plot_uris,
        "notes": notes,
    }
    doc = json_safe(doc)
    st.write_bytes(join_uri(out, "sweep.json"), (json.dumps(doc, indent=2) + "\n").encode())
    parent.log_dict(doc, "sweep.json")
    parent.set_tags({"sweep.output": out, "sweep.points": str(len(results)), **hack_tags})
    log.info("sweep: %d points -> %s", len(results), out)
    return doc


def _hacking(
    results: list[dict[str, Any]],
    notes: list[str],
    run_label: str,
    target_reward: str | None,
    tts: dict[str, Any] | None = None,
) -> tuple[dict[str, str], "Figure | None"]:
    """The reward-hacking monitor over the ω and target grids and the best-of-N grid (docs/hacking.md):
    each flag goes to the point that ends its interval (``hacking_flags``; best-of-N flags to
    ``tts["hacking_flags"]``) and to ``notes``; returns the parent's tags and the plot (``None`` when no
    grid has two points). A sweep the monitor cannot read is noted, not failed."""
    try:
        by_grid = hacking.monitor_sweep(results, hacking.DEFAULT_K)
        if tts is not None and len(tts.get("points") or []) >= 2:
            by_grid["best_of_n"] = hacking.monitor_best_of_n(tts, hacking.DEFAULT_K)
    except hacking.HackingInputError as err:
        log.warning("sweep: %s", err)
        notes.append(f"hacking monitor skipped: {err}")
        return {"hacking.error": str(err)}, None
    flags = [f for grid in by_grid.values() for f in grid]
    for pt in results:
        if pt["kind"] in by_grid:
            pt["hacking_flags"] = [f.to_dict() for f in by_grid[pt["kind"]] if f.end == pt["name"]]
    if tts is not None and "best_of_n" in by_grid:
        tts["hacking_flags"] = [f.to_dict() for f in by_grid["best_of_n"]]
    notes.extend(f"hacking: {f.text()}" for f in flags)
    xlabels = {"guidance": "guidance scale ω", "target": f"target {target_reward}"}
    return hacking.flag_tags(flags), hacking.sweep_figure(results, by_grid, run_label, xlabels, best_of_n=tts)


def _series(points: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Every reward's mean and the judge's overall accuracy along a list of points."""
    names: list[str] = []
    for p in points:
        for r in p["rewards"]:
            if r not in names:
                names.append(r)
    series: dict[str, list[float | None]] = {r: [p["rewards"].get(r) for p in points] for r in names}
    if any(p.get("overall") is not None for p in points):
        series["overall"] = [p.get("overall") for p in points]
    return series


def _figures(
    results: list[dict[str, Any]],
    tts: dict[str, Any] | None,
    grids: dict[str, tuple[list[np.ndarray], list[str]]],
    prompts: list[str],
    run_label: str,
    target_reward: str | None,
    select_by: str,
) -> dict[str, "Figure"]:
    """Every sweep figure by file name."""
    figs: dict[str, Figure] = {}
    guid = [p for p in results if p["kind"] == "guidance"]
    targ = [p for p in results if p["kind"] == "target"]
    if guid:
        figs["guidance.png"] = plots.tradeoff(
            [p["x"] for p in guid], _series(guid), xlabel="guidance scale ω", title=f"{run_label}: guidance trade-off"
        )
        radar_in = {f"ω={_fmt(p['x'])}": {k: v for k, v in p["rewards"].items()} for p in guid}
        if len({k for v in radar_in.values() for k in v}) >= 3:
            figs["radar_guidance.png"] = plots.radar(radar_in, title=f"{run_label}: reward means by ω")
    if targ:
        figs[f"target_{target_reward}.png"] = plots.tradeoff(
            [p["x"] for p in targ],
            _series(targ),
            xlabel=f"target {target_reward}",
            title=f"{run_label}: {target_reward} target trade-off",
        )
    if tts is not None:
        figs["tts.png"] = plots.tts_curves({run_label: tts}, select_by)
        if "overall" in tts["curves"]:
            figs["tts_overall.png"] = plots.tts_curves({run_label: tts}, "overall")
    for kind, (cols, labels) in grids.items():
        if not cols:
            continue
        k = min(c.shape[0] for c in cols)
        arr = np.stack([c[:k] for c in cols], axis=1)  # [k prompts, columns, H, W, 3]
        figs[f"grid_{kind}.png"] = plots.image_grid(
            arr, prompts[:k] if len(prompts) >= k else None, labels, title=f"{run_label}: {kind} (fixed seeds)"
        )
    return figs
