"""The whole MIRO pipeline as one Prefect flow: prepare → score/bin → embed → train → evaluate.

A thin layer over :mod:`miroflow.stages`, with the run set of :func:`miroflow.recipes.pipeline_runs`.

Each stage is a task (or the score subflow) over the library; tasks exchange URIs and small dicts.
Every stage is idempotent and resumable, so re-running the flow after a failure redoes only what
is missing (finished shards, score tables and trainings are skipped).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.evaluate import evaluate_model_task
from flows.score_dataset import score_dataset
from flows.train import train_task
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


@flow(name="miro-pipeline", log_prints=True)
def miro_pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    with_baseline: bool = True,
) -> dict[str, Any]:
    """Run every stage; with ``with_baseline`` also train/evaluate the no-reward baseline.

    The MIRO run is ``train.run_name``; the baseline is ``<train.run_name>-baseline``
    (:func:`miroflow.recipes.baseline_of`); each run writes its own manifests.
    """
    p = resolve_params(params_file, overrides, params)
    log = get_run_logger()
    data = prepare_task(p.model_dump(mode="json"))
    log.info("prepared %s samples in %s shards -> %s", data["num_samples"], data["shards"], data["root"])
    scores = score_dataset(params=p)
    embeds = embed_task(p.model_dump(mode="json"))
    results: dict[str, Any] = {}
    for rp in pipeline_runs(p, with_baseline=with_baseline):
        name = rp.train.run_name
        trained = train_task.with_options(task_run_name=f"train-{name}")(rp.model_dump(mode="json"), resume=True)
        evaluated = evaluate_model_task(rp.model_dump(mode="json"), run_name=name)
        results[name] = {"train": trained, "evaluate": evaluated}
        log.info("%s: loss %.4f, judge accuracy %s", name, trained["loss"], evaluated["overall"])
    return {
        "data": data,
        "scores": {k: scores[k] for k in ("shards", "scored", "skipped", "failures")},
        "embeds": embeds,
        "runs": results,
    }


if __name__ == "__main__":
    miro_pipeline()
