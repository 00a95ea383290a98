"""Experiment tracking with MLflow (DESIGN §5, §7.9).

One MLflow experiment per study (``params.tracking.experiment``), one run per training job, one
child run per sweep point. Everything goes through :class:`mlflow.MlflowClient` with an explicit
run id (no fluent "active run" stack), so trackers can be used from several threads at once
(Prefect's thread task runner).

Tracking URI (:func:`resolve_tracking_uri`): ``MLFLOW_TRACKING_URI`` if set, else
``params.tracking.tracking_uri``, else ``sqlite:///<abs cwd>/work/mlflow.db`` with artifacts in
``<abs cwd>/work/mlruns`` (the ``file:./mlruns`` store is deprecated in MLflow 3 and raises).

Secrets never reach MLflow or the logs: every params dict, tag and logged dict passes through
:func:`redact`, which masks values under credential-like keys (``*secret*``, ``*password*``,
``*token*``, ``*key*``, ``AWS_*``, ...), passwords in URIs with userinfo (``user:pass@host``),
``NAME=value`` assignments of credential-like names and AWS access key ids inside strings.

The tracker API (structurally the ``Tracker`` protocol of ``miroflow.train``)::

    with start_run(params, run_name="miro") as tracker:
        tracker.log_metrics({"loss": 0.1}, step=10)
        tracker.log_image(grid_hwc_uint8, key="samples/ema", step=10)
        tracker.log_checkpoint("s3://bucket/runs/miro/checkpoints/step-00000010", step=10)
        tracker.register_model("work/store/runs/miro/final", name="miro-shapes")
        with tracker.child_run("omega=1.0", params={"omega": 1.0}) as child:
            child.log_metrics({"reward/sharpness": 0.7}, step=0)

:class:`miroflow.train.NullTracker` (not duplicated here) is what ``tracking.enabled: false`` gets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from miroflow.config import Params, TrackingConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient

__all__ = [
    "REDACTED",
    "MAX_PARAM_VALUE_LENGTH",
    "MlflowTracker",
    "resolve_tracking_uri",
    "default_artifact_location",
    "start_run",
    "child_run",
    "absolute_uri",
    "optional_run",
    "StepDefaultTracker",
    "flatten_params",
    "redact",
    "redact_text",
    "is_secret_key",
    "register_model",
    "git_info",
    "file_sha256",
]

log = logging.getLogger(__name__)

#: What a redacted value is replaced with.
REDACTED = "***REDACTED***"
#: MLflow's limits (mlflow.utils.validation in 3.x): param values, tag values, key length, batch sizes.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
#: Characters MLflow accepts in param/metric/tag keys; anything else becomes "_".
_INVALID_KEY_CHARS = re.compile(r"[^\w.\- :/]")
_IMAGE_KEY_INVALID = re.compile(r"[^a-zA-Z0-9_\-./ ]")

#: Substrings of a key (lower-cased) that mark its value as a credential.
_SECRET_SUBSTRINGS = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "apikey",
    "api_key",
    "access_key",
    "accesskey",
    "private_key",
    "privatekey",
    "session_token",
    "auth_token",
    "bearer",
)
#: Whole key segments (split on non-alphanumerics and camelCase) that mark a credential.
_SECRET_SEGMENTS = frozenset({"token", "key", "pwd", "pass", "auth", "authorization", "cookie", "signature", "sig"})
#: ``user:password@`` inside URIs (any scheme).
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
#: ``NAME=value`` / ``NAME: value`` with a credential-like NAME inside free text.
_ASSIGNMENT = re.compile(
    r"(?i)\b(?P<name>(?:aws_[a-z_]+|[a-z0-9_]*(?:secret|password|passwd|token|api_?key|access_?key)[a-z0-9_]*))"
    r"(?P<sep>\s*[=:]\s*)(?P<q>['\"]?)(?P<val>[^\s'\",;&]+)"
)
#: AWS access key ids (AKIA..., ASIA...).
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")


# --------------------------------------------------------------------------- redaction


def _key_segments(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [s for s in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if s]


def is_secret_key(key: str) -> bool:
    """True if a (leaf) key name looks like it holds a credential.

    Matches ``AWS_*``, any key containing ``secret``/``password``/``credential``/``api_key``/...,
    and keys with a whole segment ``token``/``key``/``pwd``/``auth`` (``github_token``,
    ``apiKey``, ``key``), but not ``tokens`` or ``max_tokens`` or ``keys``.
    """
    leaf = key.rsplit(".", 1)[-1]
    low = leaf.lower()
    if low.startswith("aws_") or low == "aws":
        return True
    if any(s in low for s in _SECRET_SUBSTRINGS):
        return True
    return any(seg in _SECRET_SEGMENTS for seg in _key_segments(leaf))


def redact_text(text: str) -> str:
    """Mask credentials inside a free-text string.

    ``scheme://user:pass@host`` -> ``scheme://user:***REDACTED***@host``; ``AWS_SECRET_ACCESS_KEY=x``
    / ``password: x`` -> value masked; AWS access key ids masked. Other text is unchanged.
    """
    if not text:
        return text
    out = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    out = _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{m['q']}{REDACTED}", out)
    return _AWS_KEY_ID.sub(REDACTED, out)


def _has_value(v: Any) -> bool:
    return not (v is None or (isinstance(v, (str, bytes, list, tuple, dict, set)) and len(v) == 0))


def _to_plain(obj: Any) -> Any:
    """Pydantic models -> dicts (JSON mode); everything else unchanged."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return obj


def redact(d: Any) -> Any:
    """A redacted deep copy of ``d`` (dict, list, pydantic model, str or scalar).

    Values under credential-like keys (:func:`is_secret_key`) with a non-empty value become
    :data:`REDACTED` (a whole sub-dict under such a key included); strings anywhere are passed
    through :func:`redact_text`. The input is never modified.
    """
    d = _to_plain(d)
    if isinstance(d, Mapping):
        out: dict[Any, Any] = {}
        for k, v in d.items():
            if is_secret_key(str(k)) and _has_value(v):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(d, (list, tuple)):
        return type(d)(redact(v) for v in d) if isinstance(d, list) else tuple(redact(v) for v in d)
    if isinstance(d, str):
        return redact_text(d)
    return d


# --------------------------------------------------------------------------- flattening


def _sanitize_key(key: str) -> str:
    key = _INVALID_KEY_CHARS.sub("_", key)
    return key[:MAX_KEY_LENGTH]


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def _scalar_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, (bool, int, float)):
        return str(v)
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(v)


def flatten_params(d: Any, prefix: str = "", max_value_length: int = MAX_PARAM_VALUE_LENGTH) -> dict[str, str]:
    """Flatten nested dicts (or a pydantic model) to ``{"a.b.c": str}`` for MLflow params.

    Lists/tuples become JSON (``["a", "b"]``), ``None`` becomes ``"None"``, an empty dict becomes
    ``"{}"``. Keys are sanitised to MLflow's alphabet (other characters -> ``_``) and cut to 250
    characters; values are truncated to ``max_value_length`` (MLflow's 6000). Does **not** redact:
    call :func:`redact` first (``MlflowTracker.log_params`` does).
    """
    d = _to_plain(d)
    out: dict[str, str] = {}
    if not isinstance(d, Mapping):
        raise TypeError(f"flatten_params expects a dict or pydantic model, got {type(d).__name__}")
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        v = _to_plain(v)
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key, max_value_length))
        elif isinstance(v, Mapping):
            out[_sanitize_key(key)] = "{}"
        else:
            out[_sanitize_key(key)] = _truncate(_scalar_str(v), max_value_length)
    return out


# --------------------------------------------------------------------------- URIs, git, hashes


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: ``<dir of the db>/mlruns`` for a local ``sqlite:///`` URI.

    ``None`` for anything else (a server decides itself; ``--artifacts-destination``).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///") :]
    if not db or db == ":memory:":
        return None
    db_path = Path("/" + db.lstrip("/")) if tracking_uri.startswith("sqlite:////") else Path(db)
    return (db_path.resolve().parent / "mlruns").as_uri()


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking_uri``, else ``sqlite:///<abs cwd>/work/mlflow.db``.

    The default also creates ``work/`` so SQLite can open the file. Artifacts of experiments created
    on a local SQLite store go to ``<db dir>/mlruns`` (:func:`default_artifact_location`).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    work = Path.cwd().resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute; ``s3://``/``file://`` URIs unchanged."""
    from miroflow.storage import InvalidURIError, parse_uri

    try:
        p = parse_uri(uri)
    except InvalidURIError:
        return uri
    if p.kind == "file" and not p.file_scheme and p.path is not None and not p.path.is_absolute():
        return str(p.path.resolve())
    return uri


def _safe_uri(uri: str) -> str:
    return redact_text(uri)


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """``{"git_commit": sha|"unknown", "git_dirty": "true"|"false"|"unknown"}`` for ``cwd``.

    Never raises: no git binary, no repository, or a repository without commits all give
    ``git_commit="unknown"``.
    """

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--verify", "--quiet", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        dirty = "unknown"
    elif commit is None:
        # A repository without commits: everything is uncommitted.
        dirty = "true"
    else:
        dirty = "true" if status else "false"
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def file_sha256(path: str | Path) -> str | None:
    """Hex sha256 of a local file, or ``None`` if it does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``params`` redacted, flattened to dotted keys, values truncated, in batches of 100."""
        from mlflow.entities import Param

        flat = flatten_params(redact(params))
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH], synchronous=True)
        log.debug("mlflow run %s: logged %d params", self.run_id, len(items))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log scalar metrics at ``step`` in one batch (tensors/numpy scalars are converted with ``float``)."""
        from mlflow.entities import Metric

        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step must be an int, got {step!r}")
        ts = int(time.time() * 1000)
        items: list[Any] = []
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {k!r} is not a scalar number: {v!r}") from e
            items.append(Metric(_sanitize_key(str(k)), value, ts, int(step)))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH], synchronous=True)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Log one frame of the image series ``key`` at ``step`` (MLflow's step slider in the UI).

        Stored as ``images/<key with / -> ~>+step+<step>+timestamp+...png`` (+ a ``.webp`` thumbnail).

        Raises:
            ValueError: wrong shape/dtype/range (the message names the shape) or a bad key.
        """
        arr = _to_hwc_uint8(image)
        if not key or _IMAGE_KEY_INVALID.search(key):
            raise ValueError(f"image key {key!r} may only contain letters, digits, _ - . / and spaces")
        self.client.log_image(self.run_id, arr, key=key, step=int(step), synchronous=True)

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        """Write ``d`` (redacted) as a JSON/YAML artifact (by the file's extension)."""
        self.client.log_dict(self.run_id, redact(d), artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values redacted and truncated to MLflow's 8000 characters)."""
        from mlflow.entities import RunTag

        red = redact(dict(tags))
        items = [
            RunTag(_sanitize_key(str(k)), _truncate(_scalar_str(v), MAX_TAG_VALUE_LENGTH)) for k, v in red.items()
        ]
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

    def register_model(self, checkpoint: str | Path, name: str) -> str:
        """Log ``checkpoint`` (the ``final/`` dir) into this run and register it; returns the version."""
        return register_model(self.run_id, checkpoint, name, tracking_uri=self.tracking_uri)

    @contextmanager
    def child_run(
        self, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None
    ) -> Iterator["MlflowTracker"]:
        """A child run of this run (tag ``mlflow.parentRunId``) in the same experiment."""
        child = _create_run(
            self.client, self.tracking_uri, self.experiment_id, run_name, parent_run_id=self.run_id, tags=tags
        )
        with child:
            if params:
                child.log_params(params)
            yield child


# --------------------------------------------------------------------------- runs

_thread_state = threading.local()


def _active_stack() -> list[MlflowTracker]:
    stack = getattr(_thread_state, "stack", None)
    if stack is None:
        stack = _thread_state.stack = []
    return stack


def _get_or_create_experiment(client: "MlflowClient", name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri)))
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently by another thread/process
        if exp is None:
            raise
        return str(exp.experiment_id)


def _create_run(
    client: "MlflowClient",
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> MlflowTracker:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    all_tags = {str(k): _truncate(_scalar_str(v), MAX_TAG_VALUE_LENGTH) for k, v in redact(dict(tags or {})).items()}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    log.info(
        "mlflow run %s (%s) started in experiment %s at %s%s",
        run.info.run_id,
        run_name,
        experiment_id,
        _safe_uri(tracking_uri),
        f", parent {parent_run_id}" if parent_run_id else "",
    )
    return MlflowTracker(client, run.info.run_id, tracking_uri, experiment_id)


@contextmanager
def start_run(
    params: Params,
    run_name: str,
    parent_run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
) -> Iterator[MlflowTracker]:
    """Start an MLflow run for ``params`` and yield its :class:`MlflowTracker`.

    The run lives in experiment ``params.tracking.experiment`` at :func:`resolve_tracking_uri`.
    Logged at start: the whole config flattened and redacted as params; tags ``git_commit``,
    ``git_dirty`` (and MLflow's ``mlflow.source.git.commit`` when known), param ``git_commit``;
    ``data_manifest_sha256`` (param + tag) when ``params.data.manifest`` exists.

    ``parent_run_id`` makes it a child run; ``nested=True`` without one uses the innermost run
    started by ``start_run`` in this thread as the parent (or MLflow's fluent active run).
    On exit the run is ``FINISHED``, or ``FAILED`` if an exception escaped.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(params.tracking)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    exp_id = _get_or_create_experiment(client, params.tracking.experiment, uri)
    if parent_run_id is None and nested:
        stack = _active_stack()
        if stack:
            parent_run_id = stack[-1].run_id
        else:
            import mlflow

            active = mlflow.active_run()
            if active is None:
                raise ValueError("nested=True needs an active parent run (or pass parent_run_id)")
            parent_run_id = active.info.run_id
    git = git_info()
    run_tags: dict[str, str] = {"git_commit": git["git_commit"], "git_dirty": git["git_dirty"]}
    if git["git_commit"] != "unknown":
        run_tags["mlflow.source.git.commit"] = git["git_commit"]
    manifest_sha = file_sha256(params.data.manifest)
    if manifest_sha is not None:
        run_tags["data_manifest_sha256"] = manifest_sha
    run_tags.update(tags or {})
    tracker = _create_run(client, uri, exp_id, run_name, parent_run_id=parent_run_id, tags=run_tags)
    stack = _active_stack()
    stack.append(tracker)
    try:
        with tracker:
            extra: dict[str, Any] = {"git_commit": git["git_commit"]}
            if manifest_sha is not None:
                extra["data_manifest_sha256"] = manifest_sha
            tracker.log_params({**params.model_dump(mode="json"), **extra})
            yield tracker
    finally:
        if tracker in stack:
            stack.remove(tracker)


@contextmanager
def child_run(
    parent: MlflowTracker,
    run_name: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[MlflowTracker]:
    """One child run of ``parent`` (e.g. one sweep point); see :meth:`MlflowTracker.child_run`."""
    with parent.child_run(run_name, params=params, tags=tags) as child:
        yield child


# --------------------------------------------------------------------------- model registry

#: Files copied from a checkpoint directory into the registered model artifact.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json")


class StepDefaultTracker:
    """Adapter giving ``log_metrics``/``log_image`` a default ``step`` (0) over a tracker that needs one.

    :func:`miroflow.evaluate.run_evaluate` calls ``tracker.log_metrics(metrics)`` without a step,
    while :class:`miroflow.tracking.MlflowTracker.log_metrics` requires it; everything else is
    forwarded unchanged.
    """

    def __init__(self, tracker: Any, step: int = 0) -> None:
        self._t = tracker
        self._step = int(step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Forward with ``step`` (default: the adapter's step)."""
        self._t.log_metrics(metrics, step=self._step if step is None else int(step))

    def log_image(self, image: np.ndarray, key: str, step: int | None = None) -> None:
        """Forward with ``step`` (default: the adapter's step)."""
        self._t.log_image(image, key=key, step=self._step if step is None else int(step))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


@contextmanager
def optional_run(params: Params, run_name: str, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker | None]:
    """An MLflow run (:func:`miroflow.tracking.start_run`) when ``tracking.enabled``, else ``None``."""
    if not params.tracking.enabled:
        yield None
        return
    with start_run(params, run_name=run_name, tags=tags) as tracker:
        yield tracker


def _copy_checkpoint(src: str | Path, dst: Path) -> int:
    """Copy the ``*.safetensors``/``*.json`` files of a local dir or URI prefix into ``dst``; returns the count."""
    from miroflow.storage import Storage, parse_uri

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
    storage = Storage()
    prefix = s.rstrip("/") + "/"
    for uri in storage.list(prefix):
        rel = uri[len(prefix) :]
        if rel.endswith(_MODEL_FILE_SUFFIXES):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(uri))
            n += 1
    if n == 0:
        raise FileNotFoundError(f"no *.safetensors/*.json files under checkpoint {src}")
    return n


def register_model(
    run_id: str,
    artifact_path_or_uri: str | Path,
    name: str,
    tracking_uri: str | None = None,
    artifact_path: str = "final",
) -> str:
    """Register a model version for the end of training; returns the version (e.g. ``"1"``).

    ``artifact_path_or_uri`` is either a checkpoint directory (local path, ``file://`` or ``s3://``
    prefix: its ``*.safetensors`` and ``*.json`` files are copied into the run's artifacts under
    ``artifact_path``), a ``runs:/<id>/<path>`` URI, or the path of an artifact already in the run.
    The registered model ``name`` is created if it does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(None)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
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
    mv = client.create_model_version(name, source=source, run_id=run_id)
    version = str(mv.version)
    log.info("registered model %s version %s from %s", name, version, source)
    return version

