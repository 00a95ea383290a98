"""Prefect flow of the reward-target search (a thin layer over :func:`miroflow.tune_stage.tune_targets`).

The flow passes the params as a JSON dict and returns a small dict of URIs, ids and scalars."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows._records import FLOW_RESULTS, abs_uri, mlflow_ref, publish, rounded
from miroflow.config import Params, resolve_params
from miroflow.storage import join_uri
from miroflow.tune_stage import tune_targets as run_tune_targets

__all__ = ["tune_targets", "tune_targets_task"]


@task(name="tune_targets_model", task_run_name="tune-targets-{run_name}")
def tune_targets_task(params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """Run (or resume) the search; returns ``{"output", "tune_json", "summary", "study_name", "storage",
    "parent_run_id", "n_trials", "new_trials", "best", "heldout", "beats_default", "plots", "manifest"}``."""
    r = run_tune_targets(Params.model_validate(params))
    get_run_logger().info(
        "tune-targets of %s: %d trials (%d new), best trial %s; beats default on held-out: %s -> %s",
        run_name,
        r.n_trials,
        r.new_trials,
        r.best["trial"],
        r.beats_default,
        r.output,
    )
    output = abs_uri(r.output) or r.output
    return {
        "output": output,
        "tune_json": join_uri(output, "tune.json"),
        "summary": r.summary,
        "study_name": r.study_name,
        "storage": r.storage,
        "parent_run_id": r.parent_run_id,
        "n_trials": r.n_trials,
        "new_trials": r.new_trials,
        "best": r.best,
        "heldout": r.heldout,
        "beats_default": r.beats_default,
        "plots": r.plots,
        "manifest": r.manifest,
    }


@flow(name="tune-targets", log_prints=True, **FLOW_RESULTS)
def tune_targets(
    params_file: str | None = "params.yaml",
    overrides: list[str] | None = None,
    params: Params | None = None,
    trials: int | None = None,
) -> dict[str, Any]:
    """Search a checkpoint's reward-target vector (and ω) with Optuna; held-out check of the best vector.

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last.
        params: typed config form (``tune`` is its search section); only the fields you set are merged onto
            ``params_file``'s values.
        trials: the study's trial budget (``tune.trials``); empty: the params' value.
    """
    extra = [f"tune.trials={trials}"] if trials is not None else []
    p = resolve_params(params_file, [*(overrides or []), *extra], params)
    out = tune_targets_task(p.model_dump(mode="json"), run_name=p.train.run_name)
    held = out.get("heldout") or {}
    facts = {
        "trials": f"{out['n_trials']} ({out['new_trials']} new)",
        "best trial": out["best"].get("trial"),
        "best objective": rounded(out["best"].get("value")),
        "held-out best - default": rounded((held.get("difference") or {}).get("mean")),
        "beats default": out["beats_default"],
        "tune.json": f"`{out['tune_json']}`",
        "MLflow search run": mlflow_ref(p, out.get("parent_run_id")),
    }
    rows = [
        {"vector": "best", "held-out mean": (held.get("best") or {}).get("mean"), **_targets(out["best"])},
        {"vector": "default", "held-out mean": (held.get("default") or {}).get("mean")},
    ]
    publish("tune-targets", p, facts, rows)
    return out


def _targets(vector: dict[str, Any]) -> dict[str, Any]:
    """``target/<reward>`` columns (and ω) of a reward-target vector."""
    cols = {f"target/{k}": rounded(v) for k, v in (vector.get("reward_targets") or {}).items()}
    if vector.get("guidance_scale") is not None:
        cols["guidance_scale"] = rounded(vector["guidance_scale"])
    return cols
