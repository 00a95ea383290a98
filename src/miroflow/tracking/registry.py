"""The MLflow model registry: a training run's final checkpoint as a registered model version."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from miroflow.storage import Storage, parse_uri
from miroflow.tracking.uris import resolve_tracking_uri

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient

__all__ = ["register_model", "record_evaluation"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- model registry

#: Files copied from a checkpoint directory into the registered model artifact.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json")


def _copy_checkpoint(src: str | Path, dst: Path) -> int:
    """Copy the ``*.safetensors``/``*.json`` files of a local dir or URI prefix into ``dst``; returns the count."""

    s = str(src)
    p = parse_uri(s)
    n = 0
    if p.kind == "file":
        root = p.path
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {src}")
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name.endswith(_MODEL_FILE_SUFFIXES) and not f.name.endswith(".tmp"):
                target = dst / f.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                n += 1
        return n
    n += len(Storage().download_tree(s, dst, select=lambda rel: rel.endswith(_MODEL_FILE_SUFFIXES)))
    if n == 0:
        raise FileNotFoundError(f"no *.safetensors/*.json files under checkpoint {src}")
    return n


def _client(tracking_uri: str | None) -> "MlflowClient":
    """A client of ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else the default) with the registry at
    ``MLFLOW_REGISTRY_URI`` or the same URI."""
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import; untracked runs never need it

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(None)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def register_model(
    run_id: str,
    artifact_path_or_uri: str | Path,
    name: str,
    tracking_uri: str | None = None,
    artifact_path: str = "final",
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register a model version for the end of training; returns the version (e.g. ``"1"``).

    ``artifact_path_or_uri`` is either a checkpoint directory (local path, ``file://`` or ``s3://``
    prefix: its ``*.safetensors`` and ``*.json`` files are copied into the run's artifacts under
    ``artifact_path``), a ``runs:/<id>/<path>`` URI, or the path of an artifact already in the run.
    The registered model ``name`` is created if it does not exist. ``tags`` are set on the new
    version; ``alias`` (e.g. ``candidate``) is moved to it, so ``models:/<name>@<alias>`` names it.
    """
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import; untracked runs never need it

    client = _client(tracking_uri)
    src = str(artifact_path_or_uri)
    if src.startswith("runs:/"):
        source = src
    else:
        is_checkpoint = src.startswith(("s3://", "file://")) or Path(src).is_dir()
        if is_checkpoint:
            with tempfile.TemporaryDirectory(prefix="miroflow-register-") as tmp:
                n = _copy_checkpoint(src, Path(tmp))
                if n == 0:
                    raise FileNotFoundError(f"no *.safetensors/*.json files under checkpoint {src}")
                client.log_artifacts(run_id, tmp, artifact_path)
            rel = artifact_path
        else:
            rel = src.strip("/")
            listed = client.list_artifacts(run_id, rel)
            if not listed:
                raise FileNotFoundError(f"{src!r} is neither a checkpoint directory nor an artifact of run {run_id}")
        source = f"runs:/{run_id}/{rel}"
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags or {}))
    version = str(mv.version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered model %s version %s%s from %s", name, version, f" (@{alias})" if alias else "", source)
    return version


def record_evaluation(
    train_run_id: str,
    metrics: Mapping[str, float],
    step: int,
    eval_run_id: str | None,
    tracking_uri: str | None = None,
) -> list[str]:
    """Put an evaluation's numbers on the training run it evaluated (docs/control-room.md).

    The training run gets ``metrics`` (``eval/overall``, ``eval/<category>``, ``eval/reward/<name>``) at
    ``step`` (the evaluated checkpoint's step) and the tag ``eval.run_id``; every registered model
    version made from that run gets the tags ``eval_accuracy`` (``eval/overall``, 4 decimals) and
    ``eval_run_id``, so the registry shows how good each version is. Returns ``"<name>/<version>"`` of
    the tagged versions.
    """
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None and math.isfinite(v)]
    client.log_batch(train_run_id, metrics=values)
    if eval_run_id:
        client.set_tag(train_run_id, "eval.run_id", eval_run_id)
    tagged: list[str] = []
    overall = metrics.get("eval/overall")
    for mv in client.search_model_versions(f"run_id = '{train_run_id}'"):
        if overall is not None and math.isfinite(overall):
            client.set_model_version_tag(mv.name, mv.version, "eval_accuracy", f"{overall:.4f}")
        if eval_run_id:
            client.set_model_version_tag(mv.name, mv.version, "eval_run_id", eval_run_id)
        tagged.append(f"{mv.name}/{mv.version}")
    return tagged
