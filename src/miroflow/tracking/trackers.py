"""The one :class:`Tracker` protocol, :class:`NullTracker` and :class:`MlflowTracker`."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from miroflow.tracking.context import default_run_tags, echo_metrics
from miroflow.tracking.layout import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, RUN_NAME_TAG
from miroflow.tracking.redact import (
    MAX_TAG_VALUE_LENGTH,
    flatten_params,
    redact,
    redact_text,
    sanitize_key,
    scalar_str,
    truncate,
)
from miroflow.tracking.registry import register_model
from miroflow.tracking.uris import absolute_uri, default_artifact_location, safe_uri

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import; untracked runs never need it

__all__ = ["Tracker", "NullTracker", "MlflowTracker", "create_run", "get_or_create_experiment"]

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_IMAGE_KEY_INVALID = re.compile(r"[^a-zA-Z0-9_\-./ ]")


# --------------------------------------------------------------------------- images


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """Validate and convert an image to ``uint8 [H, W]`` or ``[H, W, C]`` (C in 1, 3, 4).

    Accepts numpy arrays (or anything with ``.numpy()``/``__array__`` such as CPU tensors) of shape
    ``[H, W]``, ``[H, W, C]`` or channel-first ``[C, H, W]`` with C in {1, 3, 4} (channel-first only
    when W > 4, to stay unambiguous); floats must be in
    [0, 1] (values are clipped after a tolerance of 1e-3), integers in [0, 255].
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    shape = tuple(arr.shape)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] > 4:
        arr = np.transpose(arr, (1, 2, 0))  # CHW -> HWC
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))) or arr.size == 0:
        raise ValueError(
            f"image must have shape [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4) and H, W > 0; got shape {shape}"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"image of shape {shape} contains NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float image of shape {shape} must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer image of shape {shape} must be in [0, 255], got range [{lo}, {hi}]")
        arr = arr.astype(np.uint8)
    else:
        raise ValueError(f"image of shape {shape} has unsupported dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- trackers


@runtime_checkable
class Tracker(Protocol):
    """What every stage logs to: :class:`MlflowTracker` records, :class:`NullTracker` drops.

    ``run_id`` is ``None`` for a tracker that records nothing; ``child_run`` yields a tracker of
    the same kind; ``register_model`` returns the registered version (``None`` when not recorded).
    """

    @property
    def run_id(self) -> str | None: ...  # read-only here: MlflowTracker's is always a str

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None: ...  # uint8 [H, W, 3]
    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None: ...
    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None: ...
    def log_figure(self, fig: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_checkpoint(self, uri: str, step: int) -> None: ...
    def register_model(
        self, checkpoint: str | Path, name: str, alias: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str | None: ...
    def child_run(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> AbstractContextManager["Tracker"]: ...


class NullTracker:
    """A :class:`Tracker` that records nothing (``run_id`` is ``None``)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Drop params."""

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Drop metrics (only echoed to the ``miroflow.tracking.metrics`` logger)."""
        echo_metrics(metrics, step)

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """Drop an image."""

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Drop a dict artifact."""

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Drop a table."""

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Drop a figure."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Drop a file artifact."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Drop tags."""

    def log_checkpoint(self, uri: str, step: int) -> None:
        """Drop a checkpoint record."""

    def register_model(
        self, checkpoint: str | Path, name: str, alias: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Nothing is registered: ``None``."""
        return None

    @contextmanager
    def child_run(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator["NullTracker"]:
        """Another :class:`NullTracker`."""
        yield NullTracker()


class MlflowTracker:
    """Logs to one MLflow run through :class:`mlflow.MlflowClient` with an explicit run id.

    Thread-safe for concurrent ``log_*`` calls. Use as a context manager (``start_run`` returns
    one): on exit the run is marked ``FINISHED`` (``FAILED`` if an exception escaped, ``KILLED``
    on KeyboardInterrupt).
    """

    def __init__(self, client: "MlflowClient", run_id: str, tracking_uri: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self._lock = threading.Lock()
        self._checkpoints: list[dict[str, Any]] = []
        self._ended = False

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "MlflowTracker":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.end(status)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (idempotent)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.client.set_terminated(self.run_id, status=status)
        log.info("mlflow run %s ended: %s", self.run_id, status)

    # -------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` redacted, flattened to dotted keys, values truncated, in batches of 100."""
        from mlflow.entities import Param  # lazy: mlflow takes seconds to import; untracked runs never need it

        flat = flatten_params(redact(dict(params)))
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH], synchronous=True)
        log.debug("mlflow run %s: logged %d params", self.run_id, len(items))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log scalar metrics at ``step`` in one batch (tensors/numpy scalars are converted with ``float``);
        also echoed to the ``miroflow.tracking.metrics`` logger (:func:`~miroflow.tracking.context.echo_metrics`)."""
        from mlflow.entities import Metric  # lazy: mlflow takes seconds to import; untracked runs never need it

        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step must be an int, got {step!r}")
        ts = int(time.time() * 1000)
        items: list[Any] = []
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {k!r} is not a scalar number: {v!r}") from e
            items.append(Metric(sanitize_key(str(k)), value, ts, int(step)))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH], synchronous=True)
        echo_metrics(metrics, int(step))

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """Log one frame of the image series ``key`` at ``step`` (MLflow's step slider in the UI).

        Stored as ``images/<key with / -> ~>+step+<step>+timestamp+...png`` (+ a ``.webp`` thumbnail).

        Raises:
            ValueError: wrong shape/dtype/range (the message names the shape) or a bad key.
        """
        arr = _to_hwc_uint8(image)
        if not key or _IMAGE_KEY_INVALID.search(key):
            raise ValueError(f"image key {key!r} may only contain letters, digits, _ - . / and spaces")
        self.client.log_image(self.run_id, arr, key=key, step=int(step), synchronous=True)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Write ``d`` (redacted) as a JSON/YAML artifact (by the file's extension)."""
        self.client.log_dict(self.run_id, redact(dict(d)), artifact_file)

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Log ``{column: values}`` (equal lengths) as an MLflow table artifact (``.json``; shown as a table in
        the run's artifacts; a second call with the same file appends rows).

        Raises:
            ValueError: no columns, columns of different lengths, or ``artifact_file`` not ending in ``.json``.
        """
        lengths = {k: len(v) for k, v in table.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"table for {artifact_file!r} needs columns of one length, got {lengths}")
        if not artifact_file.endswith(".json"):
            raise ValueError(f"table artifact_file must end in .json, got {artifact_file!r}")
        self.client.log_table(self.run_id, data={k: list(v) for k, v in table.items()}, artifact_file=artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values redacted and truncated to MLflow's 8000 characters)."""
        from mlflow.entities import RunTag  # lazy: mlflow takes seconds to import; untracked runs never need it

        red = redact(dict(tags))
        items = [RunTag(sanitize_key(str(k)), truncate(scalar_str(v), MAX_TAG_VALUE_LENGTH)) for k, v in red.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _PARAMS_PER_BATCH], synchronous=True)

    def log_checkpoint(self, uri: str, step: int) -> None:
        """Record a checkpoint: tags ``checkpoint_uri``/``checkpoint_step`` and ``checkpoints.json``.

        ``checkpoints.json`` lists every checkpoint recorded by this tracker: ``{"checkpoints":
        [{"step", "uri"}], "latest": uri}``. A relative local path is recorded as an absolute one
        (:func:`absolute_uri`), so the URI still works from another working directory.
        """
        safe = redact_text(absolute_uri(str(uri)))
        with self._lock:
            self._checkpoints = [c for c in self._checkpoints if c["step"] != int(step)]
            self._checkpoints.append({"step": int(step), "uri": safe})
            self._checkpoints.sort(key=lambda c: c["step"])
            payload = {"checkpoints": list(self._checkpoints), "latest": safe}
        self.set_tags({"checkpoint_uri": safe, "checkpoint_step": str(int(step))})
        self.client.log_dict(self.run_id, payload, "checkpoints.json")

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Save a matplotlib (or plotly) figure as an artifact."""
        self.client.log_figure(self.run_id, fig, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file or directory (directories recursively) under ``artifact_path``."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {p}")

    def register_model(
        self, checkpoint: str | Path, name: str, alias: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        """Log ``checkpoint`` (the ``final/`` dir) into this run and register it (tagged, ``alias`` moved to
        the new version); returns the version."""
        return register_model(self.run_id, checkpoint, name, tracking_uri=self.tracking_uri, alias=alias, tags=tags)

    @contextmanager
    def child_run(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator["MlflowTracker"]:
        """A child run of this run (tag ``mlflow.parentRunId``) in the same experiment."""
        child = create_run(
            self.client,
            self.tracking_uri,
            self.experiment_id,
            run_name,
            parent_run_id=self.run_id,
            tags=dict(tags) if tags else None,
        )
        with child:
            if params:
                child.log_params(params)
            yield child


def get_or_create_experiment(client: "MlflowClient", name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (or restored) as a model-training experiment.

    New experiments get tag ``mlflow.experimentKind = custom_model_development`` (MLflow 3 opens an
    experiment without it in the GenAI view); an existing one without the tag gets it once (a kind
    someone chose in the UI is kept).
    """
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import; untracked runs never need it

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    try:
        return str(
            client.create_experiment(
                name,
                artifact_location=default_artifact_location(tracking_uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        )
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently by another thread/process
        if exp is None:
            raise
        return str(exp.experiment_id)


def create_run(
    client: "MlflowClient",
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    title: str | None = None,
) -> MlflowTracker:
    """Open a run named ``title`` (default ``run_name``) with tag ``miroflow.run_name = run_name``, the
    default tags (:func:`~miroflow.tracking.context.default_run_tags`), ``tags`` and the parent's id."""
    from mlflow.utils.mlflow_tags import (
        MLFLOW_PARENT_RUN_ID,
    )  # lazy: mlflow takes seconds to import; untracked runs never need it

    given = {**default_run_tags(), RUN_NAME_TAG: run_name, **dict(tags or {})}  # DVC stage, MIROFLOW_RUN_TAGS, ...
    all_tags = {str(k): truncate(scalar_str(v), MAX_TAG_VALUE_LENGTH) for k, v in redact(given).items()}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    name = title or run_name
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    log.info(
        "mlflow run %s (%s) started in experiment %s at %s%s",
        run.info.run_id,
        name,
        experiment_id,
        safe_uri(tracking_uri),
        f", parent {parent_run_id}" if parent_run_id else "",
    )
    return MlflowTracker(client, run.info.run_id, tracking_uri, experiment_id)
