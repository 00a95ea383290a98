"""The whole MIRO pipeline as one Prefect flow: prepare → score/bin → embed → train → evaluate.

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
from miroflow.config import Params, apply_overrides, resolve_params

__all__ = ["miro_pipeline", "prepare_task", "embed_task"]


@task(name="prepare")
def prepare_task(params: dict[str, Any]) -> dict[str, Any]:
    """Render/import the dataset into shards; returns the shard root and counts."""
    from miroflow.prepare import run_prepare

    m = run_prepare(Params.model_validate(params))
    return {"root": m["root"], "shards": len(m["shards"]), "num_samples": m["num_samples"]}


@task(name="embed")
def embed_task(params: dict[str, Any]) -> dict[str, Any]:
    """Precompute text-embedding sidecars; returns their count and the encoder spec."""
    from miroflow.embed import run_embed

    m = run_embed(Params.model_validate(params))
    return {"sidecars": len(m["sidecars"]), "encoder": m["encoder"]}


@flow(name="miro-pipeline", log_prints=True)
def miro_pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    with_baseline: bool = True,
) -> dict[str, Any]:
    """Run every stage; with ``with_baseline`` also train/evaluate the no-reward baseline.

    The MIRO run is ``train.run_name``; the baseline is ``<train.run_name>-baseline``
    (``train.rewards=[]``, otherwise identical params).
    """
    p = resolve_params(params_file, overrides, params)
    log = get_run_logger()
    data = prepare_task(p.model_dump(mode="json"))
    log.info("prepared %s samples in %s shards -> %s", data["num_samples"], data["shards"], data["root"])
    scores = score_dataset(params=p)
    embeds = embed_task(p.model_dump(mode="json"))
    runs = {p.train.run_name: p}
    if with_baseline:
        runs[f"{p.train.run_name}-baseline"] = apply_overrides(p, [f"train.run_name={p.train.run_name}-baseline", "train.rewards=[]"])
    results: dict[str, Any] = {}
    for name, rp in runs.items():
        trained = train_task.with_options(task_run_name=f"train-{name}")(rp.model_dump(mode="json"), resume=True)
        evaluated = evaluate_model_task(rp.model_dump(mode="json"), run_name=name)
        results[name] = {"train": trained, "evaluate": evaluated}
        log.info("%s: loss %.4f, judge accuracy %s", name, trained["loss"], evaluated["overall"])
    return {"data": data, "scores": {k: scores[k] for k in ("shards", "scored", "skipped", "failures")}, "embeds": embeds, "runs": results}


if __name__ == "__main__":
    miro_pipeline()
