"""Prefect flow for the evaluate stage (a thin layer over :func:`miroflow.stages.evaluate`).

``evaluate`` loads the params (file + overrides, or a typed :class:`~miroflow.config.Params` the
Prefect UI renders as a form), then one ``evaluate_model`` task evaluates the checkpoint
(``eval.checkpoint``, else the latest of ``train.run_name``) and returns a small summary with
URIs; images and tensors stay in storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.results import EvalSummary

__all__ = ["evaluate", "evaluate_model_task", "small_summary"]


def small_summary(summary: EvalSummary) -> dict[str, Any]:
    """The part of an evaluation a flow passes on: scalars and URIs only."""
    return {
        "output": summary.output,
        "summary_uri": summary.output.rstrip("/") + "/summary.json",
        "results_uri": summary.output.rstrip("/") + "/results.jsonl",
        "checkpoint": summary.checkpoint,
        "overall": summary.overall,
        "accuracy": summary.accuracy,
        "rewards": summary.reward_means(),
        "n_images": summary.n_images,
        "mlflow_run_id": summary.mlflow_run_id,
        "manifest": summary.manifest,
    }


@task(name="evaluate_model", task_run_name="evaluate-{run_name}")
def evaluate_model_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Evaluate one model (``params``: the whole config as a JSON dict); returns :func:`small_summary`."""
    out = small_summary(stages.evaluate(Params.model_validate(params)))
    get_run_logger().info("evaluated %s: overall=%s -> %s", out["checkpoint"], out["overall"], out["output"])
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(
    params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``eval.prompt_set`` (GenEval-style accuracy + reward means).

    Args:
        params_file: params.yaml to load (ignored when ``params`` is given).
        overrides: DVC-style ``section.key=value`` overrides applied on top.
        params: a full typed config (the Prefect UI renders it as a form).
    """
    p = resolve_params(params_file, overrides, params)
    return evaluate_model_task(p.model_dump(mode="json"), run_name=p.train.run_name)
