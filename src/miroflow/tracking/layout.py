"""How miroflow's MLflow runs are laid out: names, logged params sections, the experiment kind.

- **Run names.** Every top-level run gets a unique, descriptive display name
  (:func:`unique_run_name`: ``train-demo-miro-600steps-3f9a1c``) and keeps its plain name in the tag
  :data:`RUN_NAME_TAG` (``miroflow.run_name = demo-miro``), which lookups by name use
  (:func:`run_label`, ``miroflow compare``).
- **Params.** A run logs the config sections that matter to its stage (:data:`STAGE_SECTIONS`,
  :func:`stage_params`), not all ~90 keys; the full resolved config is the artifact ``params.yaml``
  of every run (:func:`log_config`).
- **Experiments** are created as model-training experiments (tag :data:`EXPERIMENT_KIND_TAG` =
  :data:`EXPERIMENT_KIND`), so MLflow 3 opens them in its runs view, not the GenAI view.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from miroflow.config import Params

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow.entities import Run

    from miroflow.tracking.trackers import Tracker

__all__ = [
    "RUN_NAME_TAG",
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_KIND",
    "PARAMS_ARTIFACT",
    "STAGE_SECTIONS",
    "stage_params",
    "log_config",
    "unique_run_name",
    "run_label",
]

#: Tag holding a run's plain name (``demo-miro``, ``eval-demo-miro``): what lookups by name match.
RUN_NAME_TAG = "miroflow.run_name"
#: The experiment tag MLflow 3 reads to pick an experiment's view (mlflow/server/js: ``experimentKind``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Its value for classic model training ("custom_model_development"; the GenAI view is "genai_development").
EXPERIMENT_KIND = "custom_model_development"
#: Artifact of every run: the whole resolved config (redacted).
PARAMS_ARTIFACT = "params.yaml"

#: Config sections (or single ``section.key`` entries) logged as params by each stage's run.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pipeline": ("data", "score", "train", "eval", "storage.root"),
    "train": ("data", "score", "train", "storage.root"),
    "evaluate": ("eval", "train.run_name"),
    "tts": ("eval", "sweep", "train.run_name"),
    "sweep": ("eval", "sweep", "train.run_name"),
    "tune": ("eval", "tune", "train.run_name"),
    "compare": ("eval.prompt_set",),
}


def stage_params(params: Params, stage: str | None) -> dict[str, Any]:
    """The nested params dict ``stage`` logs: its :data:`STAGE_SECTIONS` entries (every section for a
    stage not listed, e.g. a study's run). Nested dicts are flattened to dotted keys on logging."""
    doc = params.model_dump(mode="json")
    entries = STAGE_SECTIONS.get(stage or "")
    if entries is None:
        return doc
    out: dict[str, Any] = {}
    for entry in entries:
        section, _, key = entry.partition(".")
        if key:
            out.setdefault(section, {})[key] = doc[section][key]
        else:
            out[section] = doc[section]
    return out


def log_config(tracker: Tracker, params: Params, stage: str | None) -> None:
    """Log ``stage``'s params sections and the whole config as ``params.yaml`` (both redacted)."""
    tracker.log_params(stage_params(params, stage))
    tracker.log_dict(params.model_dump(mode="json"), PARAMS_ARTIFACT)


def unique_run_name(name: str, detail: str | None = None) -> str:
    """``<name>[-<detail>]-<6 hex>``: descriptive and unique (e.g. ``train-demo-miro-600steps-3f9a1c``).

    Raises:
        ValueError: an empty ``name``.
    """
    if not name.strip():
        raise ValueError("run name must not be empty")
    parts = [name.strip(), *([detail.strip()] if detail and detail.strip() else []), uuid.uuid4().hex[:6]]
    return "-".join(parts)


def run_label(run: Run) -> str:
    """A run's plain name: tag :data:`RUN_NAME_TAG`, else its display name, else its id's first 8 chars."""
    tags: Mapping[str, str] = run.data.tags
    return tags.get(RUN_NAME_TAG) or run.info.run_name or run.info.run_id[:8]
