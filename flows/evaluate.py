"""Prefect flow for the evaluate stage (a thin layer over :func:`miroflow.stages.evaluate`).

``evaluate`` loads the params (file + overrides, or a typed :class:`~miroflow.config.Params` the
Prefect UI renders as a form), then one ``evaluate_model`` task evaluates the checkpoint
(``eval.checkpoint``, else the latest of ``train.run_name``) and returns a small summary with
URIs; images and tensors stay in storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._records import FLOW_RESULTS, abs_uri, mlflow_ref, publish, rounded
from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.results import EvalSummary

__all__ = ["evaluate", "evaluate_model_task", "small_summary", "eval_facts", "eval_row"]


def small_summary(summary: EvalSummary) -> dict[str, Any]:
    """The part of an evaluation a flow passes on: scalars and (absolute) URIs only."""
    output = abs_uri(summary.output) or summary.output
    return {
        "output": output,
        "summary_uri": output.rstrip("/") + "/summary.json",
        "results_uri": output.rstrip("/") + "/results.jsonl",
        "checkpoint": abs_uri(summary.checkpoint),
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


def eval_row(name: str, evaluated: dict[str, Any]) -> dict[str, Any]:
    """One table row: run name, judge accuracy and every reward mean (rounded)."""
    rewards = evaluated.get("rewards") or {}
    return {
        "run": name,
        "judge_accuracy": rounded(evaluated.get("overall")),
        **{f"reward/{k}": rounded(v) for k, v in rewards.items()},
    }


def eval_facts(p: Params, name: str, evaluated: dict[str, Any]) -> dict[str, Any]:
    """Summary lines of one evaluation: judge accuracy, images, absolute URIs, MLflow run."""
    return {
        f"{name} judge accuracy": rounded(evaluated.get("overall")),
        f"{name} images": evaluated.get("n_images"),
        f"{name} evaluated checkpoint": f"`{abs_uri(evaluated.get('checkpoint'))}`",
        f"{name} eval summary": f"`{evaluated.get('summary_uri')}`",
        f"{name} MLflow eval run": mlflow_ref(p, evaluated.get("mlflow_run_id")),
    }


@flow(name="evaluate", log_prints=True, **FLOW_RESULTS)
def evaluate(
    params_file: str | None = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``eval.prompt_set`` (GenEval-style accuracy + reward means).

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last.
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
    """
    p = resolve_params(params_file, overrides, params)
    out = evaluate_model_task(p.model_dump(mode="json"), run_name=p.train.run_name)
    name = p.train.run_name
    publish("evaluate", p, eval_facts(p, name, out), [eval_row(name, out)])
    return out
