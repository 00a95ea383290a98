"""Starting MLflow runs: :func:`start_run`, :func:`child_run` and :func:`tracked_run` (a
:class:`~miroflow.tracking.trackers.NullTracker` when tracking is off or off rank 0)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from miroflow.config import Params
from miroflow.tracking.trackers import MlflowTracker, NullTracker, Tracker, create_run, get_or_create_experiment
from miroflow.tracking.uris import file_sha256, git_info, resolve_tracking_uri

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

__all__ = ["start_run", "child_run", "tracked_run"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- runs

_thread_state = threading.local()


def _active_stack() -> list[MlflowTracker]:
    stack = getattr(_thread_state, "stack", None)
    if stack is None:
        stack = _thread_state.stack = []
    return stack


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
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import; untracked runs never need it

    uri = resolve_tracking_uri(params.tracking)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    exp_id = get_or_create_experiment(client, params.tracking.experiment, uri)
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
    git = git_info()
    run_tags: dict[str, str] = {"git_commit": git["git_commit"], "git_dirty": git["git_dirty"]}
    if git["git_commit"] != "unknown":
        run_tags["mlflow.source.git.commit"] = git["git_commit"]
    manifest_sha = file_sha256(params.data.manifest)
    if manifest_sha is not None:
        run_tags["data_manifest_sha256"] = manifest_sha
    run_tags.update(tags or {})
    tracker = create_run(client, uri, exp_id, run_name, parent_run_id=parent_run_id, tags=run_tags)
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


@contextmanager
def tracked_run(
    params: Params, run_name: str, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None
) -> Iterator[Tracker]:
    """An MLflow run (:func:`start_run`) when ``tracking.enabled`` on the main process (``RANK`` 0),
    else a :class:`NullTracker`: the one way every stage says "track this, or not". ``parent_run_id``
    nests it under that run (an evaluation under its training run)."""
    if not params.tracking.enabled or int(os.environ.get("RANK", "0")) != 0:
        yield NullTracker()
        return
    with start_run(params, run_name=run_name, tags=dict(tags or {}), parent_run_id=parent_run_id) as tracker:
        yield tracker
