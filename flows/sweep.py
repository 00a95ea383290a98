"""Prefect flows for the sweep stage and best-of-N test-time scaling (thin layers over
:func:`miroflow.sweep.run_sweep` and :func:`miroflow.tts.run_tts`).

``sweep``: one task runs the ω, reward-target and best-of-N grids of one checkpoint; MLflow gets
one parent run with a child per point (see :mod:`miroflow.sweep`). ``tts``: one task runs
best-of-N alone (logged to an MLflow run ``tts-<train.run_name>`` when tracking is on). Both pass
the params as a JSON dict and return small dicts of URIs and scalars.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from miroflow.config import Params, resolve_params

__all__ = ["sweep", "tts", "sweep_task", "tts_task"]


@task(name="sweep_model", task_run_name="sweep-{run_name}")
def sweep_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Run the sweep; returns ``{"output", "sweep_json", "parent_run_id", "points": [{name, run_id}], "plots"}``."""
    from miroflow.storage import join_uri
    from miroflow.sweep import run_sweep

    doc = run_sweep(Params.model_validate(params))
    get_run_logger().info("sweep of %s: %d points -> %s", run_name, len(doc["points"]), doc["output"])
    return {
        "output": doc["output"],
        "sweep_json": join_uri(doc["output"], "sweep.json"),
        "parent_run_id": doc["parent_run_id"],
        "points": [{"name": p["name"], "run_id": p["run_id"]} for p in doc["points"]],
        "plots": doc["plots"],
        "notes": doc["notes"],
    }


@task(name="tts_model", task_run_name="tts-{run_name}")
def tts_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Best-of-N of one model; returns ``{"output", "tts_json", "ns", "select_by", "curves", "mlflow_run_id"}``."""
    from miroflow.storage import join_uri
    from miroflow.tracking import StepDefaultTracker, optional_run
    from miroflow.tts import run_tts

    p = Params.model_validate(params)
    with optional_run(p, f"tts-{run_name}", tags={"stage": "tts"}) as tracker:
        res = run_tts(p, tracker=StepDefaultTracker(tracker) if tracker is not None else None)
        run_id = tracker.run_id if tracker is not None else None
    return {
        "output": res["output"],
        "tts_json": join_uri(res["output"], "tts.json"),
        "ns": res["ns"],
        "select_by": res["select_by"],
        "curves": res["curves"],
        "mlflow_run_id": run_id,
    }


def _load(params_file: str, overrides: list[str] | None, params: Params | None) -> Params:
    return resolve_params(params_file, overrides, params)


@flow(name="sweep", log_prints=True)
def sweep(params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None) -> dict[str, Any]:
    """Sweep ω, one reward's target and best-of-N for a checkpoint (one MLflow child run per point).

    Args:
        params_file: params.yaml to load (ignored when ``params`` is given).
        overrides: DVC-style ``section.key=value`` overrides applied on top.
        params: a full typed config (the Prefect UI renders it as a form).
    """
    p = _load(params_file, overrides, params)
    return sweep_task(p.model_dump(mode="json"), run_name=p.train.run_name)


@flow(name="tts", log_prints=True)
def tts(params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None) -> dict[str, Any]:
    """Best-of-N test-time scaling of a checkpoint (``sweep.best_of_n``, ``sweep.select_by``)."""
    p = _load(params_file, overrides, params)
    return tts_task(p.model_dump(mode="json"), run_name=p.train.run_name)
