"""Starting MLflow runs: :func:`start_run`, :func:`child_run`, :func:`tracked_run` (a
:class:`~miroflow.tracking.trackers.NullTracker` when tracking is off or off rank 0) and
:func:`pipeline_run` (the parent run of one pipeline invocation)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from miroflow.config import Params
from miroflow.errors import InputError
from miroflow.tracking.layout import log_config, unique_run_name
from miroflow.tracking.trackers import MlflowTracker, NullTracker, Tracker, create_run, get_or_create_experiment
from miroflow.tracking.uris import file_sha256, git_info, resolve_tracking_uri, safe_uri

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import; untracked runs never need it

__all__ = ["TrackingError", "check_parent_run", "start_run", "child_run", "tracked_run", "pipeline_run"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- runs

_thread_state = threading.local()


def _active_stack() -> list[MlflowTracker]:
    stack = getattr(_thread_state, "stack", None)
    if stack is None:
        stack = _thread_state.stack = []
    return stack


class TrackingError(InputError, ValueError):
    """A tracking input is wrong (e.g. ``tracking.parent_run_id`` names no usable run)."""


def check_parent_run(client: "MlflowClient", run_id: str, experiment_id: str, uri: str) -> None:
    """Check ``tracking.parent_run_id`` names a live run of this experiment.

    Raises:
        TrackingError: no such run, a deleted run, or a run of another experiment (names the field and the id).
    """
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(
            f"tracking.parent_run_id: no MLflow run {run_id!r} at {safe_uri(uri)} ({err.error_code}); "
            "set it to a run id of this tracking server or leave it null"
        ) from err
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"tracking.parent_run_id: MLflow run {run_id!r} is deleted")
    if str(run.info.experiment_id) != str(experiment_id):
        raise TrackingError(
            f"tracking.parent_run_id: MLflow run {run_id!r} is in experiment {run.info.experiment_id}, "
            f"not in tracking.experiment's ({experiment_id})"
        )


@contextmanager
def start_run(
    params: Params,
    run_name: str,
    parent_run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    title: str | None = None,
) -> Iterator[MlflowTracker]:
    """Start an MLflow run for ``params`` and yield its :class:`MlflowTracker`.

    The run lives in experiment ``params.tracking.experiment`` at :func:`resolve_tracking_uri`. Its
    MLflow name is ``title`` (default ``<run_name>-<6 hex>``, :func:`~miroflow.tracking.layout.unique_run_name`);
    ``run_name`` is kept in tag ``miroflow.run_name`` (what lookups by name match).
    Logged at start: the params sections of its stage (tag ``stage``;
    :data:`~miroflow.tracking.layout.STAGE_SECTIONS`) and the whole config as ``params.yaml``, both
    redacted; tags ``git_commit``, ``git_dirty`` (and MLflow's ``mlflow.source.git.commit`` when
    known), param ``git_commit``; ``data_manifest_sha256`` (param + tag) when ``params.data.manifest`` exists.

    Parent: ``parent_run_id`` if given; else with ``nested=True`` the innermost run started by
    ``start_run`` in this thread (or MLflow's fluent active run); else ``params.tracking.parent_run_id``
    (checked before the run opens, :func:`check_parent_run`).
    On exit the run is ``FINISHED``, or ``FAILED`` if an exception escaped.

    Raises:
        TrackingError: ``tracking.parent_run_id`` names no run of this experiment.
    """
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import; untracked runs never need it

    uri = resolve_tracking_uri(params.tracking)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    exp_id = get_or_create_experiment(client, params.tracking.experiment, uri)
    configured = params.tracking.parent_run_id
    if configured:
        check_parent_run(client, configured, exp_id, uri)
    if parent_run_id is None and nested:
        stack = _active_stack()
        if stack:
            parent_run_id = stack[-1].run_id
        else:
            import mlflow  # lazy: mlflow takes seconds to import; untracked runs never need it

            active = mlflow.active_run()
            if active is None:
                raise ValueError("nested=True needs an active parent run (or pass parent_run_id)")
            parent_run_id = active.info.run_id
    if parent_run_id is None:
        parent_run_id = configured
    git = git_info()
    run_tags: dict[str, str] = {"git_commit": git["git_commit"], "git_dirty": git["git_dirty"]}
    if git["git_commit"] != "unknown":
        run_tags["mlflow.source.git.commit"] = git["git_commit"]
    manifest_sha = file_sha256(params.data.manifest)
    if manifest_sha is not None:
        run_tags["data_manifest_sha256"] = manifest_sha
    run_tags.update(tags or {})
    name = title or unique_run_name(run_name)
    tracker = create_run(client, uri, exp_id, run_name, parent_run_id=parent_run_id, tags=run_tags, title=name)
    stack = _active_stack()
    stack.append(tracker)
    try:
        with tracker:
            extra: dict[str, Any] = {"git_commit": git["git_commit"]}
            if manifest_sha is not None:
                extra["data_manifest_sha256"] = manifest_sha
            tracker.log_params(extra)
            log_config(tracker, params, run_tags.get("stage"))
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


def _tracking_on(params: Params) -> bool:
    return params.tracking.enabled and int(os.environ.get("RANK", "0")) == 0


@contextmanager
def tracked_run(
    params: Params,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    title: str | None = None,
) -> Iterator[Tracker]:
    """An MLflow run (:func:`start_run`) when ``tracking.enabled`` on the main process (``RANK`` 0),
    else a :class:`NullTracker`: the one way every stage says "track this, or not". ``parent_run_id``
    nests it under that run (an evaluation under its training run; default ``tracking.parent_run_id``);
    ``title`` is its MLflow name (default ``<run_name>-<6 hex>``)."""
    if not _tracking_on(params):
        yield NullTracker()
        return
    with start_run(params, run_name=run_name, tags=dict(tags or {}), parent_run_id=parent_run_id, title=title) as t:
        yield t


@contextmanager
def pipeline_run(params: Params, name: str, tags: Mapping[str, str] | None = None) -> Iterator[str | None]:
    """The parent MLflow run of one pipeline invocation (the demo, the pipeline flow); yields its run id.

    Tag ``stage=pipeline``, MLflow name ``<name>-<train.steps>steps-<6 hex>``, plain name ``name`` in tag
    ``miroflow.run_name``. Pass the id on as ``tracking.parent_run_id`` and every top-level run of the
    invocation nests under it. Yields ``None`` (opening nothing) when tracking is off or off rank 0.
    Ends ``FINISHED``, or ``FAILED`` if an exception escaped.

    Raises:
        TrackingError: ``tracking.parent_run_id`` is set and names no run of this experiment.
    """
    if not _tracking_on(params):
        yield None
        return
    title = unique_run_name(name, f"{params.train.steps}steps")
    with start_run(params, run_name=name, tags={**dict(tags or {}), "stage": "pipeline"}, title=title) as tracker:
        yield tracker.run_id
