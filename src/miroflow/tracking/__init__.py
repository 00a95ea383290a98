"""Experiment tracking with MLflow (docs/design.md §5, §7.9).

One MLflow experiment per study (``params.tracking.experiment``, created as a model-training
experiment), one run per training job, one child run per sweep point, and one parent run per
pipeline invocation (:func:`pipeline_run`; its id as ``tracking.parent_run_id`` nests every top-level
run under it). Run names, logged params sections and artifacts: :mod:`miroflow.tracking.layout`. Everything goes through :class:`mlflow.MlflowClient` with an explicit
run id (no fluent "active run" stack), so trackers can be used from several threads at once
(Prefect's thread task runner).

Tracking URI (:func:`resolve_tracking_uri`): ``MLFLOW_TRACKING_URI`` if set, else
``params.tracking.tracking_uri``, else ``sqlite:///<abs cwd>/work/mlflow.db`` with artifacts in
``<abs cwd>/work/mlruns`` (the ``file:./mlruns`` store is deprecated in MLflow 3 and raises).

Secrets never reach MLflow or the logs: every params dict, tag and logged dict passes through
:func:`redact`, which masks values under credential-like keys (``*secret*``, ``*password*``,
``*token*``, ``*key*``, ``AWS_*``, ...), passwords in URIs with userinfo (``user:pass@host``),
``NAME=value`` assignments of credential-like names and AWS access key ids inside strings.

The tracker API (:class:`Tracker`; :class:`MlflowTracker` logs to MLflow, :class:`NullTracker`
records nothing and is what every caller gets with ``tracking.enabled: false`` or off rank 0)::

    with start_run(params, run_name="miro") as tracker:
        tracker.log_metrics({"loss": 0.1}, step=10)
        tracker.log_image(grid_hwc_uint8, key="samples/ema", step=10)
        tracker.log_checkpoint("s3://bucket/runs/miro/checkpoints/step-00000010", step=10)
        tracker.register_model("work/store/runs/miro/final", name="miro-shapes")
        with tracker.child_run("omega=1.0", params={"omega": 1.0}) as child:
            child.log_metrics({"reward/sharpness": 0.7}, step=0)

Default tags (:mod:`miroflow.tracking.context`): every run also carries ``dvc.stage`` under ``dvc repro``,
the tags of ``$MIROFLOW_RUN_TAGS`` (a JSON object) and those of registered tag providers (the Prefect
flows add the flow-run id, URL and flow name); logged metrics are echoed to the logger
``miroflow.tracking.metrics``.
"""

from miroflow.tracking.context import (
    METRICS_LOGGER,
    RUN_TAGS_ENV,
    default_run_tags,
    echo_metrics,
    register_tag_provider,
    unregister_tag_provider,
)
from miroflow.tracking.layout import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARAMS_ARTIFACT,
    RUN_NAME_TAG,
    STAGE_SECTIONS,
    log_config,
    run_label,
    stage_params,
    unique_run_name,
)
from miroflow.tracking.redact import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    REDACTED,
    flatten_params,
    is_secret_key,
    redact,
    redact_text,
)
from miroflow.tracking.registry import record_evaluation, register_model
from miroflow.tracking.runs import TrackingError, check_parent_run, child_run, pipeline_run, start_run, tracked_run
from miroflow.tracking.trackers import MlflowTracker, NullTracker, Tracker
from miroflow.tracking.uris import absolute_uri, default_artifact_location, file_sha256, git_info, resolve_tracking_uri

__all__ = [
    "Tracker",
    "NullTracker",
    "MlflowTracker",
    "tracked_run",
    "start_run",
    "child_run",
    "pipeline_run",
    "record_evaluation",
    "TrackingError",
    "check_parent_run",
    "RUN_NAME_TAG",
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_KIND",
    "PARAMS_ARTIFACT",
    "STAGE_SECTIONS",
    "stage_params",
    "log_config",
    "unique_run_name",
    "run_label",
    "register_model",
    "REDACTED",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "resolve_tracking_uri",
    "default_artifact_location",
    "absolute_uri",
    "flatten_params",
    "redact",
    "redact_text",
    "is_secret_key",
    "git_info",
    "file_sha256",
    "default_run_tags",
    "register_tag_provider",
    "unregister_tag_provider",
    "echo_metrics",
    "RUN_TAGS_ENV",
    "METRICS_LOGGER",
]
