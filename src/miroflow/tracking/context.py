"""Default tags every MLflow run gets from where it runs: a DVC stage, an orchestrator run, the environment.

:func:`default_run_tags` is merged into the tags of every run :func:`~miroflow.tracking.trackers.create_run`
opens (top-level and child runs); tags given explicitly win. Three sources, later ones winning:

- ``DVC_STAGE`` (DVC sets it for every stage command of ``dvc repro``, e.g. ``train@miro``): tag
  ``dvc.stage``; ``DVC_ROOT`` (also set by DVC): tag ``dvc.root``.
- ``MIROFLOW_RUN_TAGS``: a JSON object of string tags (e.g. ``{"team": "vision"}``) for every run of
  the process. Not JSON, or not an object: a warning, and nothing is added.
- tag providers registered with :func:`register_tag_provider`: functions called at each run's start
  (in the thread that opens the run) returning a mapping; the Prefect flows register one that adds
  ``prefect.flow_run_id`` / ``prefect.flow_run_url`` / ``prefect.flow_name`` (flows/_records.py), so
  this package never imports an orchestrator. A provider that raises is logged and skipped.

Every :func:`echo_metrics` line (``step N: key=value ...``) goes to the standard logger
``miroflow.tracking.metrics`` at INFO, whichever tracker records the metrics, so an orchestrator can
forward training progress (the loss every ``train.log_every`` steps) to its own run log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

__all__ = [
    "RUN_TAGS_ENV",
    "METRICS_LOGGER",
    "register_tag_provider",
    "unregister_tag_provider",
    "default_run_tags",
    "echo_metrics",
]

log = logging.getLogger(__name__)

#: Environment variable holding a JSON object of tags added to every MLflow run of the process.
RUN_TAGS_ENV = "MIROFLOW_RUN_TAGS"
#: Name of the standard logger every logged metric batch is echoed to (INFO).
METRICS_LOGGER = "miroflow.tracking.metrics"

TagProvider = Callable[[], Mapping[str, str]]

_providers: list[TagProvider] = []
_lock = threading.Lock()
_metrics_log = logging.getLogger(METRICS_LOGGER)


def register_tag_provider(provider: TagProvider) -> None:
    """Call ``provider()`` at every run's start and add its tags (idempotent for the same function)."""
    with _lock:
        if provider not in _providers:
            _providers.append(provider)


def unregister_tag_provider(provider: TagProvider) -> None:
    """Stop calling ``provider`` (no error when it was not registered)."""
    with _lock:
        if provider in _providers:
            _providers.remove(provider)


def _env_tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_ROOT", "dvc.root")):
        value = os.environ.get(env, "").strip()
        if value:
            tags[tag] = value
    raw = os.environ.get(RUN_TAGS_ENV, "").strip()
    if raw:
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as err:
            log.warning("%s is not JSON (%s); no tags added from it", RUN_TAGS_ENV, err)
            return tags
        if not isinstance(doc, dict):
            log.warning("%s must be a JSON object of tags, got %s; ignored", RUN_TAGS_ENV, type(doc).__name__)
            return tags
        tags.update({str(k): str(v) for k, v in doc.items() if v is not None})
    return tags


def default_run_tags() -> dict[str, str]:
    """The tags every new run gets: DVC stage, ``MIROFLOW_RUN_TAGS``, then the registered providers."""
    tags = _env_tags()
    with _lock:
        providers = list(_providers)
    for provider in providers:
        try:
            tags.update({str(k): str(v) for k, v in provider().items() if v is not None})
        except Exception as err:  # noqa: BLE001 - a tag source must never fail a run
            log.warning("run tag provider %r failed (%s: %s); skipped", provider, type(err).__name__, err)
    return tags


def echo_metrics(metrics: Mapping[str, float], step: int) -> None:
    """Log ``step N: k=v, ...`` (values to 4 significant digits) to :data:`METRICS_LOGGER` at INFO."""
    if not _metrics_log.isEnabledFor(logging.INFO):
        return
    parts = []
    for k, v in metrics.items():
        try:
            parts.append(f"{k}={float(v.item() if hasattr(v, 'item') else v):.4g}")
        except (TypeError, ValueError):
            parts.append(f"{k}={v!r}")
    _metrics_log.info("step %d: %s", int(step), ", ".join(parts))


@contextmanager
def metrics_handler(handler: logging.Handler) -> Iterator[None]:
    """``handler`` attached to the :data:`METRICS_LOGGER` logger (raised to INFO if it was quieter) for the
    duration of the block; the logger's handlers and level are restored after."""
    logger = logging.getLogger(METRICS_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
