"""Prefect flows for the sweep stage and best-of-N test-time scaling (thin layers over
:func:`miroflow.stages.sweep` and :func:`miroflow.stages.tts`). Both pass the params as a JSON
dict and return small dicts of URIs and scalars."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.storage import join_uri

__all__ = ["sweep", "tts", "sweep_task", "tts_task"]


@task(name="sweep_model", task_run_name="sweep-{run_name}")
def sweep_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Run the sweep; returns ``{"output", "sweep_json", "parent_run_id", "points": [{name, run_id}], "plots"}``."""
    r = stages.sweep(Params.model_validate(params))
    get_run_logger().info("sweep of %s: %d points -> %s", run_name, len(r.points), r.output)
    return {
        "output": r.output,
        "sweep_json": join_uri(r.output, "sweep.json"),
        "parent_run_id": r.parent_run_id,
        "points": [{"name": p["name"], "run_id": p["run_id"]} for p in r.points],
        "plots": r.plots,
        "notes": list(r.notes),
        "manifest": r.manifest,
    }


@task(name="tts_model", task_run_name="tts-{run_name}")
def tts_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Best-of-N of one model; returns ``{"output", "tts_json", "ns", "select_by", "curves", "mlflow_run_id"}``."""
    r = stages.tts(Params.model_validate(params))
    return {
        "output": r.output,
        "tts_json": join_uri(r.output, "tts.json"),
        "ns": list(r.ns),
        "select_by": r.select_by,
        "curves": r.curves,
        "mlflow_run_id": r.mlflow_run_id,
        "manifest": r.manifest,
    }


@flow(name="sweep", log_prints=True)
def sweep(
    params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Sweep ω, one reward's target and best-of-N for a checkpoint (one MLflow child run per point).

    Args:
        params_file: params.yaml to load (ignored when ``params`` is given).
        overrides: DVC-style ``section.key=value`` overrides applied on top.
        params: a full typed config (the Prefect UI renders it as a form).
    """
    p = resolve_params(params_file, overrides, params)
    return sweep_task(p.model_dump(mode="json"), run_name=p.train.run_name)


@flow(name="tts", log_prints=True)
def tts(
    params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Best-of-N test-time scaling of a checkpoint (``sweep.best_of_n``, ``sweep.select_by``)."""
    p = resolve_params(params_file, overrides, params)
    return tts_task(p.model_dump(mode="json"), run_name=p.train.run_name)
