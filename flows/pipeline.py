"""The whole MIRO pipeline as one Prefect flow: prepare → score/bin → embed → train (MIRO + baseline)
→ evaluate → sweep + best-of-N of the MIRO model.

A thin layer over :mod:`miroflow.stages`, with the run set of :func:`miroflow.recipes.pipeline_runs`.

Each stage is a task (or the score subflow) over the library; tasks exchange URIs and small dicts.
The GPU stages (train, sweep) run in this process (``dispatch="local"``) or as flow runs of the
``train``/``sweep`` deployments on the ``gpu`` work pool (``dispatch="deployments"``: a GPU worker,
possibly on another machine, picks them up; flows/_dispatch.py).
Every stage is idempotent and resumable, so re-running the flow after a failure redoes only what
is missing (finished shards, score tables and trainings are skipped; evaluation and the sweep are
recomputed, deterministically).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._dispatch import Dispatch, check_deployments, run_stage
from flows._records import (
    FLOW_RESULTS,
    check_params,
    hacking_fact,
    mlflow_ref,
    publish,
    require_confirmation,
    sweep_flags,
)
from flows.evaluate import eval_facts, eval_row, evaluate_model_task
from flows.score_dataset import score_dataset
from flows.sweep import sweep_task
from flows.train import train_facts, train_task
from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.recipes import derive, pipeline_runs
from miroflow.tracking import pipeline_run

__all__ = ["miro_pipeline", "prepare_task", "embed_task"]


@task(name="prepare")
def prepare_task(params: dict[str, Any]) -> dict[str, Any]:
    """Render/import the dataset into shards; returns the shard root and counts."""
    r = stages.prepare(Params.model_validate(params))
    return {"root": r.root, "shards": len(r.shards), "num_samples": r.num_samples, "manifest": r.manifest}


@task(name="embed")
def embed_task(params: dict[str, Any]) -> dict[str, Any]:
    """Precompute text-embedding sidecars; returns their count and the encoder spec."""
    r = stages.embed(Params.model_validate(params))
    return {"sidecars": r.sidecars, "encoder": r.encoder, "manifest": r.manifest}


def _train(p: Params, dispatch: Dispatch, deployment: str) -> dict[str, Any]:
    """Train one model of the pipeline (resuming), here or as a run of ``deployment``."""
    name = p.train.run_name
    if dispatch == "deployments":
        return run_stage(deployment, "train", p, name, {"resume": True})
    return train_task.with_options(task_run_name=f"train-{name}")(p.model_dump(mode="json"), resume=True)


def _sweep(p: Params, dispatch: Dispatch, deployment: str) -> dict[str, Any]:
    """Sweep ω, the target and best-of-N of one model, here or as a run of ``deployment``."""
    name = p.train.run_name
    if dispatch == "deployments":
        return run_stage(deployment, "sweep", p, name)
    return sweep_task(p.model_dump(mode="json"), run_name=name)


def sweep_summary(p: Params, name: str, swept: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's summary lines and table rows (one per point: ``<run> <point>`` and its numbers)."""
    points = swept.get("points") or []
    facts = {
        f"{name} sweep points": len(points),
        f"{name} sweep.json": f"`{swept.get('sweep_json')}`",
        f"{name} MLflow sweep run": mlflow_ref(p, swept.get("parent_run_id")),
        f"{name} sweep reward-hacking flags": hacking_fact(sweep_flags(swept.get("notes"))),
    }
    return facts, [sweep_row(name, pt) for pt in points]


def sweep_row(name: str, point: dict[str, Any]) -> dict[str, Any]:
    """A sweep point as a table row in the evaluation rows' columns (``judge_accuracy``, ``reward/<name>``),
    plus its coordinates (``guidance_scale``, ``x``, ``n``)."""
    row: dict[str, Any] = {"run": f"{name} {point['name']}", "judge_accuracy": point.get("overall")}
    for k, v in point.items():
        if k.startswith("rewards/"):
            row[f"reward/{k.removeprefix('rewards/')}"] = v
        elif k in ("guidance_scale", "x", "n") and v is not None:
            row[k] = v
    return row


@flow(name="miro-pipeline", log_prints=True, **FLOW_RESULTS)
def miro_pipeline(
    params_file: str | None = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    with_baseline: bool = True,
    with_sweep: bool = True,
    confirm_full_size: bool = False,
    dispatch: Dispatch = "local",
    train_deployment: str = "train/train",
    sweep_deployment: str = "sweep/sweep",
) -> dict[str, Any]:
    """Run every stage (prepare, score, bin, embed, train, evaluate, then the sweep and best-of-N of MIRO).

    The MIRO run is ``train.run_name``; the baseline is ``<train.run_name>-baseline``
    (:func:`miroflow.recipes.baseline_of`); each run writes its own manifests.

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last (e.g. ``train.steps=2``).
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
        with_baseline: also train and evaluate the no-reward baseline (``<train.run_name>-baseline``).
        with_sweep: after evaluating, sweep ω, ``sweep.target_reward``'s target and best-of-N
            (``sweep.*``) of the MIRO model.
        confirm_full_size: must be true to start a run of more than 200 training steps or 1000 samples.
        dispatch: where training and the sweep run: ``local`` (in this flow run's process) or
            ``deployments`` (as flow runs of ``train_deployment`` / ``sweep_deployment``, picked up by a
            worker of their pool, e.g. ``gpu``; this run waits for them and gets the resolved params
            to them in full).
        train_deployment: the deployment (``flow/deployment``) that trains when ``dispatch=deployments``.
        sweep_deployment: the deployment (``flow/deployment``) that sweeps when ``dispatch=deployments``.
    """
    p = resolve_params(params_file, overrides, params)
    require_confirmation(p, confirm_full_size, "confirm_full_size")
    check_params(p)
    log = get_run_logger()
    if dispatch == "deployments":
        targets = {"train_deployment": train_deployment} | (
            {"sweep_deployment": sweep_deployment} if with_sweep else {}
        )
        pools = check_deployments(targets)
        log.info("dispatching GPU stages: %s", ", ".join(f"{targets[k]} (pool {v or '-'})" for k, v in pools.items()))
    with pipeline_run(p, f"pipeline-{p.train.run_name}") as parent:
        if parent is not None:  # every stage's MLflow run nests under it (execution-only: no output moves)
            p = derive(p, tracking={"parent_run_id": parent})
        out, facts, rows = _stages(p, log, with_baseline, with_sweep, dispatch, train_deployment, sweep_deployment)
        facts["MLflow pipeline run"] = mlflow_ref(p, parent)
    publish("pipeline", p, facts, rows)
    return out | {"mlflow_parent_run_id": parent}


def _stages(
    p: Params,
    log: Any,
    with_baseline: bool,
    with_sweep: bool,
    dispatch: Dispatch,
    train_deployment: str,
    sweep_deployment: str,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Every stage of :func:`miro_pipeline` in order; returns its result, the summary facts and table rows."""
    data = prepare_task(p.model_dump(mode="json"))
    log.info("prepared %s samples in %s shards -> %s", data["num_samples"], data["shards"], data["root"])
    scores = score_dataset(params_file=None, params=p)  # p is resolved: merged onto the code defaults
    embeds = embed_task(p.model_dump(mode="json"))
    results: dict[str, Any] = {}
    facts: dict[str, Any] = {"samples": data["num_samples"], "shard root": f"`{data['root']}`", "dispatch": dispatch}
    rows: list[dict[str, Any]] = []
    runs = pipeline_runs(p, with_baseline=with_baseline)
    for rp in runs:
        name = rp.train.run_name
        trained = _train(rp, dispatch, train_deployment)
        evaluated = evaluate_model_task(rp.model_dump(mode="json"), run_name=name)
        results[name] = {"train": trained, "evaluate": evaluated}
        log.info("%s: loss %s, judge accuracy %s", name, trained.get("loss"), evaluated["overall"])
        facts.update({k if k.startswith(name) else f"{name} {k}": v for k, v in train_facts(rp, trained).items()})
        facts.update(eval_facts(rp, name, evaluated))
        rows.append({**eval_row(name, evaluated), "loss": trained.get("loss")})
    swept = None
    if with_sweep:  # the MIRO run's own params: its checkpoint folder is addressed by them (as the demo)
        miro = runs[0]
        swept = _sweep(miro, dispatch, sweep_deployment)
        sweep_facts, sweep_rows = sweep_summary(miro, miro.train.run_name, swept)
        facts.update(sweep_facts)
        rows += sweep_rows
    out = {
        "data": data,
        "scores": {k: scores[k] for k in ("shards", "scored", "skipped", "failures")},
        "embeds": embeds,
        "runs": results,
        "sweep": swept,
    }
    return out, facts, rows


if __name__ == "__main__":
    miro_pipeline()
