"""Stage entry points shared by the CLI and the Prefect flows: a stage + its MLflow run.

Each function takes the validated :class:`~miroflow.config.Params`, runs the library code, tracks
it in MLflow when ``tracking.enabled`` and writes the small local manifest DVC tracks.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from miroflow.config import Params

__all__ = ["train_stage", "evaluate_stage", "sweep_stage", "tts_stage", "TRAIN_MANIFEST"]

#: Local manifest of the train stage (DVC out): final checkpoint URI, loss, steps, MLflow run id.
TRAIN_MANIFEST = "manifests/train.json"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _tracking(params: Params, run_name: str, tags: dict[str, str]) -> AbstractContextManager[Any]:
    if not params.tracking.enabled or not _is_main_process():
        return nullcontext(None)
    from miroflow.tracking import start_run

    return start_run(params, run_name=run_name, tags=tags)


def train_stage(params: Params, resume: bool = False, max_steps: int | None = None, manifest: str | None = TRAIN_MANIFEST) -> dict[str, Any]:
    """Train (``miroflow train``), log to MLflow, register the final model when configured.

    Returns:
        ``{"checkpoint", "loss", "steps", "wall_time_s", "mlflow_run_id", "model_version"}``.
    """
    from miroflow.train import run_train

    kind = "baseline" if params.train.rewards == [] else "miro"
    with _tracking(params, params.train.run_name, {"stage": "train", "model_kind": kind}) as tracker:
        out = run_train(params, tracker=tracker, resume=resume, max_steps=max_steps)
        result = {k: v for k, v in out.items() if k != "losses"}
        result["mlflow_run_id"] = getattr(tracker, "run_id", None)
        result["model_version"] = None
        if tracker is not None and params.tracking.register_model and out["steps"] == params.train.steps:
            result["model_version"] = tracker.register_model(out["checkpoint"], params.tracking.register_model)
    if manifest and _is_main_process():
        Path(manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(manifest).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def evaluate_stage(params: Params, out_uri: str | None = None, manifest: str | None = "manifests/eval.json") -> dict[str, Any]:
    """Evaluate a checkpoint (``miroflow evaluate``) and log the summary to MLflow.

    Returns:
        The evaluation summary (per-category accuracy, overall, reward means/stds, output URI).
    """
    from miroflow.evaluate import run_evaluate

    with _tracking(params, f"eval-{params.train.run_name}", {"stage": "evaluate"}) as tracker:
        summary = run_evaluate(params, out_uri=out_uri, tracker=tracker)
    if manifest:
        Path(manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(manifest).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def sweep_stage(params: Params, manifest: str | None = "manifests/sweep.json") -> dict[str, Any]:
    """ω, reward-target and best-of-N sweeps (``miroflow sweep``): one parent MLflow run, one child per point.

    Returns:
        The sweep document (points with their metrics, plot paths, output URI).
    """
    from miroflow.sweep import run_sweep

    doc = run_sweep(params)
    if manifest:
        Path(manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(manifest).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return doc


def tts_stage(params: Params) -> dict[str, Any]:
    """Best-of-N test-time scaling (``miroflow tts``) for one checkpoint, tracked in MLflow."""
    from miroflow.tts import run_tts

    with _tracking(params, f"tts-{params.train.run_name}", {"stage": "tts"}) as tracker:
        return run_tts(params, tracker=tracker)
