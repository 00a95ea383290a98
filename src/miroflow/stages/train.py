"""Stage entry point: train one model, track it, register it, write its per-run manifest."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from miroflow.config import Params
from miroflow.data.hashing import data_hash
from miroflow.preflight import PreflightError, preflight
from miroflow.results import TrainResult
from miroflow.stages._common import DEFAULT, run_manifest_path, write_result
from miroflow.storage import Storage
from miroflow.tracking import Tracker, tracked_run, unique_run_name
from miroflow.train import resolve_reward_names, run_train

__all__ = ["train", "model_kind"]

log = logging.getLogger(__name__)


#: The registry alias a new version of each kind gets (``models:/<name>@candidate`` is the newest MIRO
#: model, ``@baseline`` the newest baseline); ``@champion`` is only ever set by a person.
REGISTRY_ALIASES = {"miro": "candidate", "baseline": "baseline"}


def model_kind(params: Params) -> str:
    """``baseline`` (no reward conditioning) or ``miro``."""
    return "baseline" if params.train.rewards == [] else "miro"


def train(
    params: Params,
    resume: bool = False,
    max_steps: int | None = None,
    manifest: str | Path | None = DEFAULT,
    tracker: Tracker | None = None,
    storage: Storage | None = None,
) -> TrainResult:
    """Train (or resume) ``train.run_name`` (``miroflow train``), tracked in MLflow when ``tracking.enabled``.

    The final model is registered as ``tracking.register_model`` when set and training reached
    ``train.steps``: the version is tagged ``kind``/``run_name``/``steps``/``rewards``/``data_hash`` (and
    ``eval_accuracy`` once evaluated, :func:`miroflow.tracking.record_evaluation`) and gets the alias
    ``candidate`` (MIRO) or ``baseline`` (:data:`REGISTRY_ALIASES`). The manifest (default ``<manifests>/train-<run name>.json``) is written on rank 0.
    The MLflow run is named ``train-<run name>-<steps>steps-<6 hex>`` (tag ``miroflow.run_name`` = the run
    name; nested under ``tracking.parent_run_id`` when set).
    ``tracker`` logs into that run instead of opening one (e.g. a study's child run); ``storage``
    defaults to one built from ``params.storage``.
    """
    if max_steps is not None and max_steps < 1:
        raise PreflightError("train", [f"--max-steps: must be >= 1, got {max_steps}"])
    preflight(params, "train", storage)
    tp = params.train
    if (tp.nproc_per_node > 1 or tp.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        log.warning(
            "train.nproc_per_node=%d, train.nnodes=%d: this call trains in one process; `miroflow train` and the "
            "train flow launch torchrun (miroflow.launch.train)",
            tp.nproc_per_node,
            tp.nnodes,
        )
    path = run_manifest_path(params, "train") if manifest == DEFAULT else manifest
    kind = model_kind(params)
    run: AbstractContextManager[Tracker] = (
        nullcontext(tracker)
        if tracker is not None
        else tracked_run(
            params,
            params.train.run_name,
            {"stage": "train", "model_kind": kind},
            title=unique_run_name(f"train-{params.train.run_name}", f"{params.train.steps}steps"),
        )
    )
    with run as tracker:
        out = run_train(params, storage=storage, tracker=tracker, resume=resume, max_steps=max_steps)
        version = None
        if params.tracking.register_model and out.steps == params.train.steps:
            version = tracker.register_model(
                out.checkpoint,
                params.tracking.register_model,
                alias=REGISTRY_ALIASES[kind],
                tags={
                    "kind": kind,
                    "run_name": params.train.run_name,
                    "steps": str(out.steps),
                    "rewards": ",".join(resolve_reward_names(params)[0]) or "none",
                    "data_hash": data_hash(params.data),
                },
            )
        result = TrainResult(
            run_name=params.train.run_name,
            kind=kind,
            checkpoint=out.checkpoint,
            loss=out.loss,
            steps=out.steps,
            wall_time_s=out.wall_time_s,
            mlflow_run_id=tracker.run_id,
            model_version=version,
            manifest=str(path) if path is not None else None,
            ema_decay=out.ema_decay,
            hacking_flags=out.hacking_flags,
        )
    write_result(result, path)
    return result
