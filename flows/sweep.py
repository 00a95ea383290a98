"""Prefect flows for the sweep stage and best-of-N test-time scaling (thin layers over
:func:`miroflow.stages.sweep` and :func:`miroflow.stages.tts`). Both pass the params as a JSON
dict and return small dicts of URIs and scalars."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._records import FLOW_RESULTS, abs_uri, hacking_fact, mlflow_ref, publish, rounded, sweep_flags
from miroflow import stages
from miroflow.config import Params, resolve_params
from miroflow.storage import join_uri

__all__ = ["sweep", "tts", "sweep_task", "tts_task"]


def _point_numbers(point: dict[str, Any]) -> dict[str, Any]:
    """The rounded scalar metrics of a sweep point (judge accuracy, reward means), flattened one level."""
    out: dict[str, Any] = {}
    for k, v in point.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("run_id",):
            out[k] = rounded(float(v))
        elif isinstance(v, dict) and k in ("rewards", "metrics"):
            out.update({f"{k}/{kk}": rounded(float(vv)) for kk, vv in v.items() if isinstance(vv, (int, float))})
    return out


@task(name="sweep_model", task_run_name="sweep-{run_name}")
def sweep_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Run the sweep; returns ``{"output", "sweep_json", "parent_run_id", "points": [{name, run_id}], "plots"}``."""
    r = stages.sweep(Params.model_validate(params))
    get_run_logger().info("sweep of %s: %d points -> %s", run_name, len(r.points), r.output)
    output = abs_uri(r.output) or r.output
    return {
        "output": output,
        "sweep_json": join_uri(output, "sweep.json"),
        "parent_run_id": r.parent_run_id,
        "points": [{"name": p["name"], "run_id": p["run_id"], **_point_numbers(p)} for p in r.points],
        "plots": r.plots,
        "notes": list(r.notes),
        "manifest": r.manifest,
    }


@task(name="tts_model", task_run_name="tts-{run_name}")
def tts_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Best-of-N of one model; returns ``{"output", "tts_json", "ns", "select_by", "curves", "mlflow_run_id"}``."""
    r = stages.tts(Params.model_validate(params))
    output = abs_uri(r.output) or r.output
    return {
        "output": output,
        "tts_json": join_uri(output, "tts.json"),
        "ns": list(r.ns),
        "select_by": r.select_by,
        "curves": r.curves,
        "mlflow_run_id": r.mlflow_run_id,
        "manifest": r.manifest,
    }


@flow(name="sweep", log_prints=True, **FLOW_RESULTS)
def sweep(
    params_file: str | None = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Sweep ω, one reward's target and best-of-N for a checkpoint (one MLflow child run per point).

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last.
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
    """
    p = resolve_params(params_file, overrides, params)
    out = sweep_task(p.model_dump(mode="json"), run_name=p.train.run_name)
    facts = {
        "points": len(out["points"]),
        "sweep.json": f"`{out['sweep_json']}`",
        "MLflow sweep run": mlflow_ref(p, out.get("parent_run_id")),
        "reward-hacking flags": hacking_fact(sweep_flags(out["notes"])),
    }
    publish(
        "sweep", p, facts, [{"run": pt["name"], **{k: v for k, v in pt.items() if k != "name"}} for pt in out["points"]]
    )
    return out


@flow(name="tts", log_prints=True, **FLOW_RESULTS)
def tts(
    params_file: str | None = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Best-of-N test-time scaling of a checkpoint (``sweep.best_of_n``, ``sweep.select_by``).

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last (e.g. ``sweep.best_of_n=[1,4]``).
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.
    """
    p = resolve_params(params_file, overrides, params)
    return tts_task(p.model_dump(mode="json"), run_name=p.train.run_name)
