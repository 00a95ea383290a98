"""What every stage entry point shares: rank, per-run manifest paths, tracking."""

from __future__ import annotations

import json
import os
from pathlib import Path

from miroflow.config import Params
from miroflow.results import Result, TrainResult
from miroflow.util import write_manifest

__all__ = ["is_main_process", "run_manifest_path", "train_run_id", "write_result", "DEFAULT"]

#: Sentinel: "the stage's default manifest path" (``None`` means "write no manifest").
DEFAULT = "<default>"


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def run_manifest_path(params: Params, stage: str, run_name: str | None = None) -> Path:
    """Per-run manifest of a stage that runs once per model: ``<manifests>/<stage>-<run name>.json``,
    next to ``data.manifest`` (so no run overwrites another's)."""
    return Path(params.data.manifest).parent / f"{stage}-{run_name or params.train.run_name}.json"


def write_result(result: Result, manifest: str | Path | None) -> None:
    """Write ``result`` as the stage's manifest on the main process (``None`` = no manifest)."""
    if manifest is not None and is_main_process():
        write_manifest(manifest, result.to_dict())


def train_run_id(params: Params) -> str | None:
    """The MLflow run id of ``train.run_name``'s training (from its manifest), or None when unknown.

    Evaluations, best-of-N and sweeps of a model are nested under it, so MLflow shows them with
    the run that trained the model."""
    try:
        doc = json.loads(run_manifest_path(params, "train").read_text(encoding="utf-8"))
        return TrainResult.from_dict(doc).mlflow_run_id
    except (OSError, ValueError, KeyError, TypeError):
        return None
