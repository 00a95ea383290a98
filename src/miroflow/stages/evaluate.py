"""Stage entry points of a trained model: evaluate, best-of-N (tts) and sweep."""

from __future__ import annotations

from pathlib import Path

from miroflow.config import Params
from miroflow.evaluate import ensure_pipeline, run_evaluate
from miroflow.pipeline import MiroPipeline
from miroflow.preflight import preflight
from miroflow.results import BestOfNResult, EvalSummary, SweepResult
from miroflow.stages._common import DEFAULT, run_manifest_path, train_run_id, write_result
from miroflow.storage import Storage, from_config
from miroflow.sweep import run_sweep
from miroflow.tracking import Tracker, record_evaluation, resolve_tracking_uri, tracked_run
from miroflow.tts import run_tts

__all__ = ["evaluate", "tts", "sweep"]


def evaluate(
    params: Params,
    out_uri: str | None = None,
    manifest: str | Path | None = DEFAULT,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
) -> EvalSummary:
    """Evaluate a checkpoint (``miroflow evaluate``): GenEval layout, judge, rewards, ``summary.json``.

    Args:
        params: the whole config (``eval`` decides prompts, seeds, ω and targets).
        out_uri: output prefix (default ``<root>/<eval.output>/<run name>-<hash>``).
        manifest: per-run manifest path (default ``<manifests>/eval-<run name>.json``; ``None`` = none).
        pipeline: an already loaded model (default: ``eval.checkpoint`` or the run's latest checkpoint).
        tracker: log into this run instead of opening ``eval-<run name>`` (e.g. a study's child run).
    """
    preflight(params, "evaluate", storage, model_given=pipeline is not None)
    path = run_manifest_path(params, "eval") if manifest == DEFAULT else manifest
    if tracker is not None:
        summary = run_evaluate(params, pipeline=pipeline, storage=storage, out_uri=out_uri, tracker=tracker)
        run_id = tracker.run_id
    else:
        train_id = train_run_id(params)
        with tracked_run(params, f"eval-{params.train.run_name}", {"stage": "evaluate"}, train_id) as t:
            summary = run_evaluate(params, pipeline=pipeline, storage=storage, out_uri=out_uri, tracker=t)
            run_id = t.run_id
    result = EvalSummary.from_dict(summary).with_ids(run_id, str(path) if path is not None else None)
    if tracker is None and train_id is not None and run_id is not None:
        # the training run carries its final eval/*; its registered versions get eval_accuracy
        step = int(summary.get("model", {}).get("step") or 0)
        record_evaluation(train_id, result.metrics(), step, run_id, resolve_tracking_uri(params.tracking))
    write_result(result, path)
    return result


def tts(
    params: Params,
    out_uri: str | None = None,
    manifest: str | Path | None = DEFAULT,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
) -> BestOfNResult:
    """Best-of-N test-time scaling (``miroflow tts``): ``max(sweep.best_of_n)`` candidates per prompt,
    selected by ``sweep.select_by``; tracked as ``tts-<run name>``; manifest ``<manifests>/tts-<run name>.json``.
    ``tracker`` logs into that run instead of opening ``tts-<run name>`` (e.g. a study's child run)."""
    preflight(params, "tts", storage, model_given=pipeline is not None)
    path = run_manifest_path(params, "tts") if manifest == DEFAULT else manifest
    if tracker is not None:
        res = run_tts(params, pipeline=pipeline, storage=storage, tracker=tracker, out_uri=out_uri)
        run_id = tracker.run_id
    else:
        with tracked_run(params, f"tts-{params.train.run_name}", {"stage": "tts"}, train_run_id(params)) as t:
            res = run_tts(params, pipeline=pipeline, storage=storage, tracker=t, out_uri=out_uri)
            run_id = t.run_id
    result = BestOfNResult.from_dict(
        {**res, "mlflow_run_id": run_id, "manifest": str(path) if path is not None else None}
    )
    write_result(result, path)
    return result


def sweep(
    params: Params,
    manifest: str | Path | None = DEFAULT,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    out_uri: str | None = None,
) -> SweepResult:
    """ω, reward-target and best-of-N grids of one model (``miroflow sweep``): one parent MLflow run
    ``sweep-<model>``, one child per point, plots on the parent; manifest ``<manifests>/sweep-<run name>.json``."""
    preflight(params, "sweep", storage, model_given=pipeline is not None)
    path = run_manifest_path(params, "sweep") if manifest == DEFAULT else manifest
    st = storage or from_config(params.storage)
    pipe, checkpoint = ensure_pipeline(params, st, pipeline)
    label = pipe.spec.run_name or params.train.run_name
    tags = {"stage": "sweep", "sweep.model": label, "sweep.checkpoint": str(checkpoint)}
    with tracked_run(params, f"sweep-{label}", tags, train_run_id(params)) as parent:
        doc = run_sweep(params, pipeline=pipe, storage=st, out_uri=out_uri, tracker=parent, checkpoint=checkpoint)
    result = SweepResult.from_dict({**doc, "manifest": str(path) if path is not None else None})
    write_result(result, path)
    return result
