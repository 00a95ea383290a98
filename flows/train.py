"""Prefect flow for the train stage (a thin layer over :func:`miroflow.launch.train`).

One task trains: in the flow's process, or, when ``train.nproc_per_node > 1`` or ``train.nnodes > 1``,
under ``torchrun`` launched by the task (:mod:`miroflow.launch`: the ranks' output streams into the task
run's log, the loss lines included; a failed launch fails the task with the exit status and the last
lines). It returns the :class:`~miroflow.results.TrainResult` as a JSON dict, never tensors.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._records import (
    FLOW_RESULTS,
    abs_uri,
    check_params,
    forward_metrics,
    hacking_fact,
    mlflow_ref,
    publish,
    rounded,
)
from miroflow import launch
from miroflow.config import Params, resolve_params

__all__ = ["train_model", "train_task"]


@task(name="train")
def train_task(params: dict[str, Any], resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Train one model (under torchrun when ``train.nproc_per_node``/``train.nnodes`` ask for it); returns
    the TrainResult (checkpoint, loss, steps, MLflow run id, manifest).

    The loss (every ``train.log_every`` steps) goes to this task's Prefect run log, and so does the other
    output of launched ranks."""
    run_log = get_run_logger()
    with forward_metrics():
        result = launch.train(Params.model_validate(params), resume=resume, max_steps=max_steps, echo=run_log.info)
    out = result.to_dict()
    out["checkpoint"] = abs_uri(out.get("checkpoint"))
    return out


def train_facts(p: Params, trained: dict[str, Any]) -> dict[str, Any]:
    """Summary lines of one training: rounded loss, steps, absolute checkpoint URI, MLflow run; each label
    starts with the run name, so the pipeline's summary keeps the lines of every run (MIRO and baseline)."""
    name = trained.get("run_name", p.train.run_name)
    return {
        f"{name} loss": rounded(trained.get("loss")),
        f"{name} steps": trained.get("steps"),
        f"{name} checkpoint": f"`{abs_uri(trained.get('checkpoint'))}`",
        f"{name} MLflow training run": mlflow_ref(p, trained.get("mlflow_run_id")),
        f"{name} reward-hacking flags": hacking_fact(trained.get("hacking_flags")),
    }


@flow(name="train", log_prints=True, **FLOW_RESULTS)
def train_model(
    params_file: str | None = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    resume: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train a MIRO model (or the baseline with ``train.rewards=[]``) and register it in MLflow.

    ``train.nproc_per_node`` > 1 (one process per GPU) or ``train.nnodes`` > 1 (with ``train.rdzv_endpoint``)
    launch torchrun from the flow's task; the result is the same as in one process.

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last.
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
        resume: continue from the latest complete checkpoint of ``train.run_name`` if there is one.
        max_steps: stop early after this many steps (smoke runs); empty: ``train.steps``.
    """
    p = resolve_params(params_file, overrides, params)
    check_params(p)
    out = train_task(p.model_dump(mode="json"), resume=resume, max_steps=max_steps)
    publish("train", p, train_facts(p, out), [{"run": p.train.run_name, "loss": out.get("loss")}])
    return out


if __name__ == "__main__":
    train_model()
