"""The whole MIRO pipeline as one Prefect flow: prepare → score/bin → embed → train → evaluate.

A thin layer over :mod:`miroflow.stages`, with the run set of :func:`miroflow.recipes.pipeline_runs`.

Each stage is a task (or the score subflow) over the library; tasks exchange URIs and small dicts.
Every stage is idempotent and resumable, so re-running the flow after a failure redoes only what
is missing (finished shards, score tables and trainings are skipped).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._records import FLOW_RESULTS, check_params, publish, require_confirmation
from flows.evaluate import eval_facts, eval_row, evaluate_model_task
from flows.score_dataset import score_dataset
from flows.train import train_facts, train_task
from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.recipes import pipeline_runs

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


@flow(name="miro-pipeline", log_prints=True, **FLOW_RESULTS)
def miro_pipeline(
    params_file: str | None = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    with_baseline: bool = True,
    confirm_full_size: bool = False,
) -> dict[str, Any]:
    """Run every stage (prepare, score, bin, embed, train, evaluate) for MIRO and, optionally, the baseline.

    The MIRO run is ``train.run_name``; the baseline is ``<train.run_name>-baseline``
    (:func:`miroflow.recipes.baseline_of`); each run writes its own manifests.

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last (e.g. ``train.steps=2``).
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
        with_baseline: also train and evaluate the no-reward baseline (``<train.run_name>-baseline``).
        confirm_full_size: must be true to start a run of more than 200 training steps or 1000 samples.
    """
    p = resolve_params(params_file, overrides, params)
    require_confirmation(p, confirm_full_size, "confirm_full_size")
    check_params(p)
    log = get_run_logger()
    data = prepare_task(p.model_dump(mode="json"))
    log.info("prepared %s samples in %s shards -> %s", data["num_samples"], data["shards"], data["root"])
    scores = score_dataset(params_file=None, params=p)  # p is resolved: merged onto the code defaults
    embeds = embed_task(p.model_dump(mode="json"))
    results: dict[str, Any] = {}
    facts: dict[str, Any] = {"samples": data["num_samples"], "shard root": f"`{data['root']}`"}
    rows: list[dict[str, Any]] = []
    for rp in pipeline_runs(p, with_baseline=with_baseline):
        name = rp.train.run_name
        trained = train_task.with_options(task_run_name=f"train-{name}")(rp.model_dump(mode="json"), resume=True)
        evaluated = evaluate_model_task(rp.model_dump(mode="json"), run_name=name)
        results[name] = {"train": trained, "evaluate": evaluated}
        log.info("%s: loss %s, judge accuracy %s", name, trained["loss"], evaluated["overall"])
        facts.update(train_facts(rp, trained) | eval_facts(rp, name, evaluated))
        rows.append({**eval_row(name, evaluated), "loss": trained.get("loss")})
    publish("pipeline", p, facts, rows)
    return {
        "data": data,
        "scores": {k: scores[k] for k in ("shards", "scored", "skipped", "failures")},
        "embeds": embeds,
        "runs": results,
    }


if __name__ == "__main__":
    miro_pipeline()
