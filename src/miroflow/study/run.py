"""The study's entry point: :func:`run_study` validates the plan, runs the stages, judges the claims
and writes the report (and logs it all to MLflow)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from miroflow import hacking
from miroflow.config import Params
from miroflow.models import create_denoiser
from miroflow.storage import Storage, from_config, join_uri
from miroflow.study import report
from miroflow.study.config import StudyConfig, load_study_config, validate_study
from miroflow.study.machine import choose_threads, cpu_model, load_average, torch_threads
from miroflow.study.runner import (
    Curves,
    StudyRun,
    curve_flags,
    found_prior_work,
    read_json,
    sample_images,
    stage_curves,
    stage_data,
    stage_schedules,
    stage_sweeps,
    stage_train,
    stage_tts,
    tts_flags,
    write_json,
)
from miroflow.tracking import tracked_run
from miroflow.train_state import ema_decay_at
from miroflow.util import json_safe

__all__ = ["run_study"]

log = logging.getLogger(__name__)


def run_study(
    params: Params,
    size: str = "default",
    out_dir: str | Path = "docs",
    storage: Storage | None = None,
    study_config: str | Path | StudyConfig | None = "study.yaml",
) -> dict[str, Any]:
    """Run (or resume) the whole study and write ``<out_dir>/results.md`` + ``<out_dir>/figures/*.png``.

    The study is validated first (:func:`~miroflow.study.config.validate_study`): a study that
    cannot run is refused before any data or training work.

    Args:
        params: the project params (``params.yaml``); the study's own settings come from ``study_config``.
        size: a size of ``study.yaml`` (``default`` = the report, ``quick`` = a smoke test of the mechanics).
        out_dir: where ``results.md`` and ``figures/`` are written (``docs`` for the committed report).
        storage: defaults to one built from ``params.storage``.
        study_config: path of ``study.yaml`` or a :class:`~miroflow.study.config.StudyConfig`.

    Returns:
        The study dict (also ``<storage.root>/study/<size>/study.json``): claims, final table,
        curves, speed-ups, TTS, sweeps, compute, ``results`` (path of results.md), ``figures``.

    Raises:
        ParamsError: the study cannot run (one ``study.<key>: problem`` line each).
    """
    t_start = time.time()
    cfg = study_config if isinstance(study_config, StudyConfig) else load_study_config(study_config)
    plan = validate_study(cfg, params, size)
    st = storage or from_config(plan.params.storage)
    prior = found_prior_work(plan, st)
    plan.manifests.mkdir(parents=True, exist_ok=True)
    load, threads = load_average(), choose_threads(cfg.threads)
    log.info(
        "study %s: root %s, %d threads (load %.1f), %s",
        size,
        plan.root,
        threads,
        load,
        "resuming earlier work" if prior else "from scratch",
    )
    out = Path(out_dir)
    with (
        torch_threads(threads),
        tracked_run(plan.params, f"study-{size}", {"study.size": size, "study.kind": "study"}) as parent,
    ):
        run = StudyRun(plan, st, parent)
        data = stage_data(run)
        train = stage_train(run)
        ev = stage_curves(run, train)
        tts = stage_tts(run, train)
        sweeps = stage_sweeps(run, train)
        schedules = stage_schedules(run, train) if plan.schedule_points else None
        study = _study_doc(run, data, train, ev, tts, sweeps)
        study["schedules"] = schedules
        study["schedule_verdict"] = report.schedule_verdict(schedules, list(plan.rewards)) if schedules else None
        study["judge_floor"] = _judge_floor(plan.params.data.resolution)
        study["hacking"] = {
            "k": 2.0,
            "against": list(hacking.DEFAULT_AGAINST),
            "curves": curve_flags(ev),
            "sweeps": sweeps.get("hacking", {}),
            "best_of_n": tts_flags(tts),
        }
        study["compute"] = _compute(run, train, t_start, threads, load, prior)
        study["notes"] = report.notes(study) + list(cfg.notes.get(size, []))
        figs = report.write_figures(study, sample_images(run, train), out / "figures")
        results = out / "results.md"
        results.write_text(report.markdown(study, figs))
        study["results"] = str(results)
        study["figures"] = {k: str(v) for k, v in figs.items()}
        write_json(st, join_uri(plan.root, "study.json"), study)
        _log_study(run, study, train, ev, results, figs)
    log.info("study %s done in %.1f min: %s", size, (time.time() - t_start) / 60, results)
    return study


def _judge_floor(resolution: int) -> dict[str, Any]:
    """:func:`miroflow.judge_floor.judge_floor` at the study's resolution: ``{"kinds": {kind: {category:
    accuracy, "overall"}}, "max": {category: max over kinds, "overall": ...}, "error": None}``; when the
    module is missing or fails, ``{"kinds": {}, "max": {}, "error": message}`` (the report says n/a)."""
    t0 = time.time()
    try:
        from miroflow.judge_floor import judge_floor

        kinds = judge_floor(resolution=int(resolution))
        keys = sorted({k for acc in kinds.values() for k in acc}, key=lambda k: (k == "overall", k))
        worst = {k: max(float(acc[k]) for acc in kinds.values() if k in acc) for k in keys}
    except Exception as err:  # noqa: BLE001 - another module's failure must not stop the report
        log.warning("study: judge floor unavailable: %s", err)
        return {"kinds": {}, "max": {}, "error": f"{type(err).__name__}: {err}", "resolution": resolution}
    log.info("study: judge floor at %d px in %.1f s: overall max %.3f", resolution, time.time() - t0, worst["overall"])
    return {"kinds": kinds, "max": worst, "error": None, "resolution": resolution}


def _study_doc(
    run: StudyRun,
    data: dict[str, Any],
    train: Mapping[str, Mapping[str, Any]],
    ev: Curves,
    tts: dict[str, Any],
    sweeps: dict[str, Any],
) -> dict[str, Any]:
    """The study dict (everything but compute, notes and outputs) with its claims judged."""
    plan, cfg, sz = run.plan, run.plan.cfg, run.plan.sz
    rewards = list(plan.rewards)
    groups: dict[str, list[str]] = {}
    for name, rec in train.items():
        groups.setdefault(rec["role"], []).append(name)
    steps_list, sp = report.speedups(ev.curves, groups, rewards)
    tr = cfg.target_reward
    tgt = (
        {
            "reward": tr,
            "targets": [p["x"] for p in sweeps["target"]],
            "values": [p.get(tr) for p in sweeps["target"]],
            "se": [p["se"].get(tr) for p in sweeps["target"]],
        }
        if tr in rewards
        else {}
    )
    tp = plan.params.train
    n_params = sum(
        p.numel()
        for p in create_denoiser(
            tp.model, rewards, text_dim=384, pooled_dim=384, in_channels=3, sample_size=plan.params.data.resolution
        ).parameters()
    )
    seeds = {role: plan.run(name).seed for role, name in plan.tts_runs.items()}
    tts_seeds = (
        f"MIRO and baseline seed {seeds['miro']}"
        if seeds["miro"] == seeds["baseline"]
        else f"MIRO seed {seeds['miro']} and baseline seed {seeds['baseline']}"
    )
    study: dict[str, Any] = {
        "size": plan.size,
        "root": plan.root,
        "experiment": cfg.experiment,
        "command": "miroflow study" + (" --quick" if plan.size == "quick" else ""),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rewards": rewards,
        "data": data,
        "resolution": plan.params.data.resolution,
        "num_bins": plan.params.score.num_bins,
        "model": tp.model,
        "model_params": n_params,
        "text_encoder": tp.text_encoder,
        "steps": plan.steps,
        "batch_size": tp.batch_size,
        "lr": tp.lr,
        "ema_decay": tp.ema_decay,
        "ema_warmup": tp.ema_warmup,
        "ema_decay_final": ema_decay_at(plan.steps, tp.ema_decay, tp.ema_warmup),
        "reward_features": tp.reward_features,
        "reward_dropout": tp.reward_dropout,
        "all_reward_dropout": tp.all_reward_dropout,
        "runs": {
            pr.name: {
                "role": pr.spec.role,
                "rewards": "all" if pr.spec.rewards is None else pr.spec.rewards,
                "syn": pr.spec.synthetic_caption_prob,
                "seed": pr.seed,
            }
            for pr in plan.runs
        },
        "groups": groups,
        "eval_steps": sz.eval_steps,
        "guidance_scale": cfg.guidance_scale,
        "eval_seed": cfg.eval_seed,
        "curve_set": f"{6 * sz.curve_prompts_per_category} prompts (shapes:{sz.curve_prompts_per_category}) × "
        f"{sz.curve_images_per_prompt} images",
        "final_set": f"{6 * sz.final_prompts_per_category} prompts (shapes:{sz.final_prompts_per_category}) × "
        f"{sz.final_images_per_prompt} images",
        "tts_set": f"{6 * sz.tts_prompts_per_category} prompts (shapes:{sz.tts_prompts_per_category}) × "
        f"{max(cfg.best_of_n)} candidates, {tts_seeds}",
        "sweep_set": f"{6 * sz.sweep_prompts_per_category} prompts × {sz.sweep_images_per_prompt} images, "
        f"ω = {cfg.guidance_scale:g} for the target sweep, all targets 1 vs 0 for the ω sweep",
        "eval_steps_list": steps_list,
        "target_reward": tr,
        "final": {n: {k: v for k, v in f.items() if not k.startswith("_")} for n, f in ev.final.items()},
        "curves": ev.curves,
        "speedup": sp,
        "tts": report.tts_claims(tts, rewards),
        "tts_raw": tts,
        "sweeps": sweeps,
        "target_sweep": tgt,
        "mlflow_run_id": run.parent.run_id,
    }
    study["claims"] = report.judge_claims(study)
    return study


def _compute(
    run: StudyRun, train: Mapping[str, Mapping[str, Any]], t_start: float, threads: int, load: float, prior: bool
) -> dict[str, Any]:
    """Machine, wall times and budget bookkeeping; ``first_full_min`` only ever comes from an invocation
    that started from scratch (``None`` while none has finished)."""
    total = time.time() - t_start
    prev = read_json(run.st, join_uri(run.plan.root, "study.json")) or {}
    pc = prev.get("compute") or {}
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "threads": threads,
        "load_avg": load,
        "torch": torch.__version__,
        "total_min": total / 60,
        "stages_s": dict(run.timings),
        "train_min": sum(r["wall_time_s"] for r in train.values()) / 60,
        "train_per_run_min": {n: r["wall_time_s"] / 60 for n, r in train.items()},
        "train_threads": {n: r.get("threads") for n, r in train.items()},
        "s_per_step": {n: r.get("s_per_step") for n, r in train.items()},
        "cumulative_min": float(pc.get("cumulative_min", 0.0)) + total / 60,
        "invocations": int(pc.get("invocations", 0)) + 1,
        "found_prior_work": prior,
        "from_scratch": not prior,
        "first_full_min": pc.get("first_full_min") if prior else total / 60,
        "budget_min": run.plan.sz.budget_min,
    }


def _log_study(
    run: StudyRun,
    study: Mapping[str, Any],
    train: Mapping[str, Mapping[str, Any]],
    ev: Curves,
    results: Path,
    figs: Mapping[str, Path],
) -> None:
    """The study's numbers, report and figures on the parent run; each run's curve and final numbers
    in an ``eval-<run>`` child (nothing is recorded with tracking off)."""
    parent = run.parent
    m: dict[str, float] = {}
    for name, s in ev.final_summaries.items():
        m.update(s.metrics(prefix=f"final/{name}/"))
    m.update({f"speedup/{r}": float(x["speedup"]) for r, x in study["speedup"].items() if x.get("speedup") is not None})
    m.update({f"claim/{i}": float(c["reproduced"]) for i, c in enumerate(study["claims"], 1)})
    hk = study.get("hacking") or {}
    monitored = [*(hk.get("curves") or {}).values(), *(hk.get("sweeps") or {}).values()]
    m["hacking/flags"] = float(sum(len(d.get("flags") or []) for d in monitored))
    floor = (study.get("judge_floor") or {}).get("max") or {}
    if "overall" in floor:
        m["judge_floor/overall"] = float(floor["overall"])
    parent.log_metrics(m, step=0)
    parent.log_dict(json_safe(study), "study.json")
    parent.log_artifact(results, "report")
    for p in figs.values():
        parent.log_artifact(p, "report/figures")
    for name in train:
        tags = {"study.kind": "eval", "study.run": name, "train_run_id": str(train[name].get("mlflow_run_id"))}
        with parent.child_run(f"eval-{name}", tags=tags) as c:
            for step, s in ev.summaries[name]:
                c.log_metrics(s.metrics(), step=step)
            c.log_metrics(ev.final_summaries[name].metrics(prefix="final/"), step=int(run.plan.steps))
