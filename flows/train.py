"""Prefect flow for the train stage (a thin layer over :func:`miroflow.stages.train`).

One task runs training in the flow's process (DDP runs are launched with ``torchrun`` outside
Prefect); it returns the :class:`~miroflow.results.TrainResult` as a JSON dict, never tensors.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from miroflow import stages
from miroflow.config import Params, resolve_params

__all__ = ["train_model", "train_task"]


@task(name="train")
def train_task(params: dict[str, Any], resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Train one model; returns the TrainResult (checkpoint, loss, steps, MLflow run id, manifest)."""
    return stages.train(Params.model_validate(params), resume=resume, max_steps=max_steps).to_dict()


@flow(name="train", log_prints=True)
def train_model(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    resume: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train a MIRO model (or the baseline with ``train.rewards=[]``) and register it in MLflow.

    Args:
        params_file: params.yaml to load (ignored when ``params`` is given).
        overrides: DVC-style ``section.key=value`` overrides.
        params: a full typed config (rendered as a form in the Prefect UI).
        resume: continue from the latest complete checkpoint of ``train.run_name`` if there is one.
        max_steps: stop early (smoke runs).
    """
    p = resolve_params(params_file, overrides, params)
    return train_task(p.model_dump(mode="json"), resume=resume, max_steps=max_steps)


if __name__ == "__main__":
    train_model()
