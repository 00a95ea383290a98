"""Stage entry point of the reward-target search (``miroflow tune-targets``): preflight, the tracked parent
run, the per-run manifest and the typed :class:`~miroflow.results.TuneResult`.

It sits on the :mod:`miroflow.stages` layer (the CLI and ``flows/tune.py`` call it and nothing else);
the search itself is :func:`miroflow.tune.run_tune`.
"""

from __future__ import annotations

from pathlib import Path

from miroflow.config import Params
from miroflow.evaluate import ensure_pipeline
from miroflow.pipeline import MiroPipeline
from miroflow.preflight import PreflightError, preflight
from miroflow.results import TuneResult
from miroflow.stages._common import DEFAULT, run_manifest_path, train_run_id, write_result
from miroflow.storage import Storage, from_config
from miroflow.tracking import tracked_run
from miroflow.tune import run_tune
from miroflow.tune_space import config_problems, model_problems, prompt_problems

__all__ = ["tune_targets"]


def tune_targets(
    params: Params,
    manifest: str | Path | None = DEFAULT,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    out_uri: str | None = None,
) -> TuneResult:
    """Search the reward-target vector (and ω) of one model for ``tune.objective``; re-evaluate the best on
    held-out prompts. One parent MLflow run ``tune-<model>`` (a child per trial and per held-out
    evaluation, plots on the parent); manifest ``<manifests>/tune-<run name>.json``.

    Args:
        params: the whole config (``tune``, ``eval``, ``tracking``, ``storage``).
        manifest: per-run manifest path (default ``<manifests>/tune-<run name>.json``; ``None`` = none).
        pipeline: an already loaded model (default: ``eval.checkpoint`` or the run's latest checkpoint).
        storage: defaults to one built from ``params.storage``.
        out_uri: output prefix (default ``<root>/<tune.output>/<study name>``).

    Raises:
        PreflightError: every bad input, each line naming its key (``tune.rewards: unknown reward 'x' ...``),
            before any model is loaded where possible, else right after.
    """
    st = storage or from_config(params.storage)
    problems = config_problems(params)
    try:  # the checks of a stage that evaluates a model: names, targets, storage, checkpoint, prompt set
        preflight(params, "sweep", st, model_given=pipeline is not None)
    except PreflightError as err:
        problems = [*err.problems, *problems]
    if not problems:
        problems = prompt_problems(params, st)
    if problems:
        raise PreflightError("tune", problems)
    pipe, checkpoint = ensure_pipeline(params, st, pipeline)
    problems = model_problems(params, pipe.reward_names)
    if problems:
        raise PreflightError("tune", problems)
    label = pipe.spec.run_name or params.train.run_name
    path = run_manifest_path(params, "tune", label) if manifest == DEFAULT else manifest
    tags = {"stage": "tune", "tune.model": label, "tune.checkpoint": str(checkpoint)}
    with tracked_run(params, f"tune-{label}", tags, train_run_id(params)) as parent:
        doc = run_tune(params, pipeline=pipe, storage=st, tracker=parent, checkpoint=checkpoint, out_uri=out_uri)
    result = TuneResult.from_dict({**doc, "manifest": str(path) if path is not None else None})
    write_result(result, path)
    return result
