"""The reward-target search (``miroflow tune-targets``): Optuna TPE over a trained model's target vector and ω.

One search is one Optuna study (:func:`miroflow.tune_space.study_name`: model + objective + a hash of
the search setup) in a relational storage (``tune.storage``, default ``optuna.db`` next to MLflow's
SQLite database, :func:`miroflow.tune_space.default_storage_url`). ``tune.trials`` is the study's
budget of *completed* trials: a rerun with the same setup resumes it and runs only the missing
trials (a killed search continues; a larger budget adds trials). Trial 0 of a new study is the
default vector (every searched target 1, ω = ``eval.guidance_scale``), then ``tune.startup_trials``
random trials, then TPE (multivariate, seeded by ``tune.seed``; a resumed sampler is re-seeded, so a
resumed search is deterministic given its history but not bit-identical to an uninterrupted one).

Each trial is one :func:`miroflow.evaluate.run_evaluate` of the loaded model (loaded once) on the
first ``tune.search_prompts`` prompts of ``eval.prompt_set`` with the search seed, tracked as a child
run ``trial-NNNN`` of the caller's parent run (``tune/objective`` + every ``eval/*`` metric). After the
search, the best vector and the default are both re-evaluated on the *next* ``tune.heldout_prompts``
prompts with ``tune.heldout_seed`` (children ``heldout-best`` / ``heldout-default``), and compared
with t-intervals over prompts and the paired difference (:mod:`miroflow.tune_stats`).

Outputs under ``<root>/<tune.output>/<study name>/``::

    tune.json                  the :class:`~miroflow.results.TuneResult` (also a parent artifact)
    summary.md                 markdown report (also a parent artifact)
    prompts/search.*           the search prompts; prompts/heldout.* the held-out ones (disjoint)
    trials/NNNN/               each trial's evaluation (results.jsonl, summary.json, images)
    heldout/{best,default}/    the held-out evaluations
    plots/objective.png        objective vs trial; plots/importances.png (Optuna importances);
    plots/heldout.png          held-out comparison (all three also parent artifacts)
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miroflow import tune_report
from miroflow.config import Params, TuneConfig
from miroflow.errors import OperationalError
from miroflow.evaluate import ensure_pipeline, run_evaluate
from miroflow.pipeline import MiroPipeline
from miroflow.plots import figure_png
from miroflow.prompts import load_prompt_set
from miroflow.results import eval_metrics
from miroflow.storage import Storage, from_config, join_uri
from miroflow.tracking import NullTracker, Tracker, redact_text, resolve_tracking_uri
from miroflow.tune_space import (
    SearchSpace,
    TuneError,
    build_space,
    config_problems,
    default_storage_url,
    study_name,
    write_prompt_subset,
)
from miroflow.tune_stats import objective_value, objective_weights, paired_difference, prompt_values, t_interval
from miroflow.util import json_safe, json_text

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["run_tune", "open_study"]

log = logging.getLogger(__name__)

#: Heartbeat of a running trial (s); a trial without one for :data:`GRACE_S` is failed by the next run.
HEARTBEAT_S = 30
GRACE_S = 120


def open_study(url: str, name: str, cfg: TuneConfig) -> "optuna.Study":
    """Create or load (``load_if_exists``) the study ``name`` at storage ``url`` with a seeded TPE sampler.

    A SQLite file's folder is created. Running trials send heartbeats, so a trial of a killed run is
    marked failed by a later run (after :data:`GRACE_S` s) instead of staying "running" forever.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///") :].split("?", 1)[0]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials, multivariate=True)
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )


def _eval_params(
    params: Params, prompt_set: str, seed: int, images_per_prompt: int, point: Mapping[str, Any]
) -> Params:
    """``params`` with ``eval`` set to evaluate ``point`` on ``prompt_set`` (all of it) with ``seed``."""
    ev = params.eval.model_copy(
        update={
            "prompt_set": prompt_set,
            "num_prompts": None,
            "seed": int(seed),
            "images_per_prompt": int(images_per_prompt),
            "guidance_scale": float(point["guidance_scale"]),
            "reward_targets": dict(point["reward_targets"]),
        }
    )
    return params.model_copy(update={"eval": ev})


def _rows(st: Storage, out: str) -> list[dict[str, Any]]:
    """The ``results.jsonl`` rows of an evaluation output."""
    text = st.read_bytes(join_uri(out, "results.jsonl")).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _point_params(point: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """MLflow params of one evaluated vector."""
    out: dict[str, Any] = {f"target.{r}": float(v) for r, v in point["reward_targets"].items()}
    out["guidance_scale"] = float(point["guidance_scale"])
    out["reward_targets"] = json.dumps(point["reward_targets"], sort_keys=True)
    out.update(extra)
    return out


def _trial_doc(trial: "optuna.trial.FrozenTrial", space: SearchSpace) -> dict[str, Any]:
    """One trial of the study as recorded in ``tune.json``."""
    try:
        point: dict[str, Any] | None = space.point(trial.params)
    except KeyError:  # a trial that failed before all its parameters were drawn
        point = None
    ua = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value if trial.value is not None and math.isfinite(trial.value) else None,
        "params": dict(trial.params),
        "point": point,
        "default": bool(ua.get("default", False)),
        "mlflow_run_id": ua.get("mlflow_run_id"),
        "output": ua.get("output"),
        "metrics": ua.get("metrics", {}),
    }


def run_tune(
    params: Params,
    pipeline: MiroPipeline | None = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
    checkpoint: str | None = None,
    out_uri: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the search of ``params.tune`` on one model and re-evaluate its best vector.

    Args:
        params: the whole config (``tune``; ``eval`` for the prompt set, steps, batch size, fixed and
            negative targets and the default ω; ``score``/``eval.rewards`` for what is scored; ``tracking``).
        pipeline: a loaded model (default: ``eval.checkpoint`` or the run's latest checkpoint, loaded once).
        storage: defaults to one built from ``params.storage``.
        tracker: the parent run (one child per trial and per held-out evaluation); default records nothing.
        checkpoint: the URI ``pipeline`` was loaded from (part of the study name; default ``eval.checkpoint``).
        out_uri: output prefix; default ``<root>/<tune.output>/<study name>``.

    Returns:
        The ``tune.json`` dict: every :class:`~miroflow.results.TuneResult` field but ``manifest``.

    Raises:
        TuneError: bad ``tune`` params (unknown or unscored reward, a reward the model lacks, too few prompts).
        OperationalError: no trial of the study completed (every objective was undefined).
    """
    st = storage or from_config(params.storage)
    t, ev = params.tune, params.eval
    parent = tracker or NullTracker()
    problems = config_problems(params)
    if problems:
        raise TuneError("; ".join(problems))
    pipe, loaded_from = ensure_pipeline(params, st, pipeline)
    checkpoint = checkpoint or loaded_from
    space = build_space(params, pipe.reward_names)
    weights = objective_weights(t.objective, t.weights)
    n_search, n_held = t.search_prompts, t.heldout_prompts
    items = load_prompt_set(ev.prompt_set, n_search + n_held, storage=st)
    if len(items) < n_search + n_held:
        raise TuneError(
            f"tune.heldout_prompts: eval.prompt_set {ev.prompt_set!r} has {len(items)} prompts, fewer than "
            f"tune.search_prompts + tune.heldout_prompts = {n_search + n_held}"
        )
    search_items, held_items = items[:n_search], items[n_search : n_search + n_held]
    run_label = pipe.spec.run_name or params.train.run_name
    name = study_name(params, run_label, checkpoint, pipe.spec.step, space, search_items)
    out = out_uri or join_uri(params.storage.root, t.output, name)
    search_set = write_prompt_subset(st, join_uri(out, "prompts", "search"), search_items)
    held_set = write_prompt_subset(st, join_uri(out, "prompts", "heldout"), held_items)
    ipp = t.images_per_prompt or ev.images_per_prompt
    search_seed = t.search_seed if t.search_seed is not None else ev.seed
    url = t.storage or default_storage_url(resolve_tracking_uri(params.tracking))
    shown_url = redact_text(url)
    notes: list[str] = []

    study = open_study(url, name, t)
    if not study.trials and t.enqueue_default:
        if space.contains_default():
            study.enqueue_trial(space.default_values(), user_attrs={"default": True})
        else:
            notes.append("the default vector lies outside the search space: it is not trial 0")
    from optuna.trial import TrialState

    done_before = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(0, t.trials - done_before)
    parent.set_tags({"tune.study": name, "tune.storage": shown_url, "tune.output": out, "tune.objective": t.objective})
    log.info("tune: study %s at %s: %d completed trials, running %d more", name, shown_url, done_before, remaining)
    best_so_far = float(study.best_value) if done_before else -math.inf

    def objective(trial: "optuna.Trial") -> float:
        nonlocal best_so_far
        point = space.suggest(trial)
        trial_out = join_uri(out, "trials", f"{trial.number:04d}")
        p_trial = _eval_params(params, search_set, search_seed, ipp, point)
        child_params = _point_params(point, **{"tune.trial": trial.number, "tune.study": name})
        tags = {"tune.kind": "trial", "tune.study": name, "tune.trial": str(trial.number)}
        with parent.child_run(f"trial-{trial.number:04d}", params=child_params, tags=tags) as child:
            summary = run_evaluate(p_trial, pipeline=pipe, storage=st, out_uri=trial_out, tracker=child)
            value = objective_value(summary, weights)
            if value is not None:
                child.log_metrics({"tune/objective": value}, step=0)
            run_id = child.run_id
        means = {k: v["mean"] for k, v in summary["rewards"].items()}
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("output", trial_out)
        trial.set_user_attr("metrics", json_safe(eval_metrics(summary["accuracy"], summary["overall"], means)))
        if value is None:
            log.warning("tune: trial %d has no objective value (a component is undefined)", trial.number)
            return math.nan
        best_so_far = max(best_so_far, value)
        parent.log_metrics({"tune/objective": value, "tune/best": best_so_far}, step=trial.number)
        log.info("tune: trial %d objective %.4f at %s", trial.number, value, json.dumps(point, sort_keys=True))
        return value

    if remaining:
        study.optimize(objective, n_trials=remaining, gc_after_trial=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise OperationalError(f"tune: no trial of study {name} completed (every objective value was undefined)")
    trials = [_trial_doc(tr, space) for tr in study.trials]
    best_trial = study.best_trial
    best_point = space.point(best_trial.params)
    default_point = space.point(space.default_values())
    default_doc = next((tr for tr in trials if tr["default"]), None)
    if best_point == default_point:
        notes.append("the best trial is the default vector: the held-out difference is 0 by construction")

    # ---- held-out re-evaluation: the best and the default vector on the same held-out prompts and seeds
    held: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for kind, point in (("default", default_point), ("best", best_point)):
        o = join_uri(out, "heldout", kind)
        p_held = _eval_params(params, held_set, t.heldout_seed, ipp, point)
        tags = {"tune.kind": "heldout", "tune.study": name}
        with parent.child_run(
            f"heldout-{kind}", params=_point_params(point, **{"tune.heldout": kind}), tags=tags
        ) as child:
            summary = run_evaluate(p_held, pipeline=pipe, storage=st, out_uri=o, tracker=child)
            value = objective_value(summary, weights)
            if value is not None:
                child.log_metrics({"tune/objective": value}, step=0)
            run_id = child.run_id
        rows[kind] = _rows(st, o)
        _, per_prompt = prompt_values(rows[kind], weights)
        means = {k: v["mean"] for k, v in summary["rewards"].items()}
        held[kind] = {
            **t_interval(per_prompt, t.confidence).to_dict(),
            "objective": value,
            "output": o,
            "mlflow_run_id": run_id,
            "metrics": eval_metrics(summary["accuracy"], summary["overall"], means),
        }
    diff = paired_difference(rows["best"], rows["default"], weights, t.confidence)
    beats = diff.low is not None and diff.low > 0.0
    heldout = {
        "prompt_set": held_set,
        "n_prompts": len(held_items),
        "seed": t.heldout_seed,
        "images_per_prompt": ipp,
        "confidence": t.confidence,
        "best": held["best"],
        "default": held["default"],
        "difference": diff.to_dict(),
    }
    held_metrics = {
        "heldout/best": float(held["best"]["mean"]),
        "heldout/default": float(held["default"]["mean"]),
        "heldout/difference": diff.mean,
    }
    if diff.low is not None and diff.high is not None:
        held_metrics.update({"heldout/difference_low": diff.low, "heldout/difference_high": diff.high})
    parent.log_metrics(held_metrics, step=0)

    # ---- importances and plots
    importances: dict[str, float] = {}
    values = {float(tr.value) for tr in complete if tr.value is not None}
    if len(values) == 1:
        notes.append(
            f"every completed trial has the same objective value ({values.pop():g}): the objective does not "
            "respond to the searched parameters here, so there are no importances to show"
        )
    elif len(complete) < 2:
        notes.append("parameter importances need at least 2 completed trials")
    else:
        import optuna

        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except Exception as err:  # noqa: BLE001 - a figure only; the search's result does not depend on it
            notes.append(f"parameter importances not computed: {err}")
    objective_label = t.objective if t.objective != "mix" else f"mix {json.dumps(weights, sort_keys=True)}"
    figures = {
        "objective.png": tune_report.objective_figure(
            trials, objective_label, f"{run_label}: {name}", default_doc["number"] if default_doc else None
        ),
        "heldout.png": tune_report.heldout_figure(heldout, objective_label, f"{run_label}: held-out re-evaluation"),
    }
    if importances:
        figures["importances.png"] = tune_report.importance_figure(importances, f"{run_label}: parameter importances")
    plot_uris: dict[str, str] = {}
    for fname, fig in figures.items():
        uri = join_uri(out, "plots", fname)
        st.write_bytes(uri, figure_png(fig))
        plot_uris[fname] = uri
        parent.log_figure(fig, f"plots/{fname}")

    doc: dict[str, Any] = {
        "run_name": run_label,
        "study_name": name,
        "storage": shown_url,
        "objective": t.objective,
        "weights": weights,
        "output": out,
        "checkpoint": checkpoint,
        "parent_run_id": parent.run_id,
        "n_trials": len(complete),
        "new_trials": len(complete) - done_before,
        "space": {**space.to_dict(), "importances": importances},
        "best": {
            "trial": best_trial.number,
            "value": best_trial.value,
            **best_point,
            "mlflow_run_id": best_trial.user_attrs.get("mlflow_run_id"),
        },
        "default": {
            "trial": default_doc["number"] if default_doc else None,
            "value": default_doc["value"] if default_doc else None,
            **default_point,
        },
        "heldout": heldout,
        "beats_default": beats,
        "trials": trials,
        "plots": plot_uris,
        "summary": join_uri(out, "summary.md"),
        "notes": notes,
    }
    doc = json_safe(doc)
    markdown = tune_report.summary_markdown(doc)
    st.write_bytes(join_uri(out, "tune.json"), json_text(doc).encode())
    st.write_bytes(doc["summary"], markdown.encode())
    parent.log_dict(doc, "tune.json")
    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "summary.md"
        md.write_text(markdown, encoding="utf-8")
        parent.log_artifact(md)
    parent.set_tags({"tune.best_trial": str(best_trial.number), "tune.beats_default": str(beats).lower()})
    log.info(
        "tune: best trial %d (search %.4f); held-out best %.4f vs default %.4f, difference %.4f [%s, %s] -> %s",
        best_trial.number,
        best_trial.value,
        held["best"]["mean"],
        held["default"]["mean"],
        diff.mean,
        diff.low,
        diff.high,
        out,
    )
    return doc
