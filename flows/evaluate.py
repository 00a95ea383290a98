"""Prefect flow for the evaluate stage (a thin layer over :func:`miroflow.evaluate.run_evaluate`).

``evaluate`` loads the params (file + overrides, or a typed :class:`~miroflow.config.Params` the
Prefect UI renders as a form), then one ``evaluate_model`` task loads the checkpoint
(``eval.checkpoint``, else the latest of ``train.run_name``), samples, scores and judges the
prompt set, writes the GenEval layout + ``results.jsonl`` + ``summary.json`` under
``<root>/<eval.output>/<run name>/`` and, with ``tracking.enabled``, logs to an MLflow run
``eval-<train.run_name>``. Only the params (a JSON dict) go in and a small summary with URIs
comes out; images and tensors stay in storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from miroflow.config import Params, resolve_params

__all__ = ["evaluate", "evaluate_model_task", "small_summary"]


def small_summary(summary: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """The part of :func:`run_evaluate`'s summary a flow passes on: scalars and URIs only."""
    return {
        "output": summary["output"],
        "summary_uri": summary["output"].rstrip("/") + "/summary.json",
        "results_uri": summary["output"].rstrip("/") + "/results.jsonl",
        "checkpoint": summary["checkpoint"],
        "overall": summary["overall"],
        "accuracy": summary["accuracy"],
        "rewards": {k: v["mean"] for k, v in summary["rewards"].items()},
        "n_images": summary["n_images"],
        "mlflow_run_id": run_id,
    }


@task(name="evaluate_model", task_run_name="evaluate-{run_name}")
def evaluate_model_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Evaluate one model; ``params`` is the whole config as a JSON dict.

    Returns:
        :func:`small_summary` (output URI, summary/results URIs, accuracy, reward means, MLflow run id).
    """
    from miroflow.evaluate import run_evaluate
    from miroflow.tracking import StepDefaultTracker, optional_run

    p = Params.model_validate(params)
    with optional_run(p, f"eval-{run_name}", tags={"stage": "evaluate"}) as tracker:
        summary = run_evaluate(p, tracker=StepDefaultTracker(tracker) if tracker is not None else None)
        run_id = tracker.run_id if tracker is not None else None
    out = small_summary(summary, run_id)
    get_run_logger().info("evaluated %s: overall=%s -> %s", summary["checkpoint"], out["overall"], out["output"])
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

    Returns:
        :func:`small_summary` of the evaluation.
    """
    p = resolve_params(params_file, overrides, params)
    return evaluate_model_task(p.model_dump(mode="json"), run_name=p.train.run_name)
