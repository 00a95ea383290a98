"""The paper in miniature: a reproducible MIRO-vs-baseline study on the shapes domain.

:func:`run_study` regenerates ``<out_dir>/results.md`` and ``<out_dir>/figures/*.png`` with one call
(``miroflow study [--quick]``). The study is validated first (:func:`validate_study`: a study that
cannot run is refused before any work). Stages, all idempotent (a killed study continues where it
stopped):

1. **data** — render the shapes set with degradations, swapped and synthetic captions; score it
   with every reward of ``score.rewards`` (weight-free rewards + the judge); fit the bins; embed
   the captions once (sidecars shared by every run).
2. **train** — every run of ``study.yaml`` (baseline, MIRO, single-reward specialists, MIRO with
   50/50 synthetic captions) with equal steps, data and seeds; a checkpoint every
   ``eval_every`` steps, none pruned. A run with a ``final/`` checkpoint is not trained again;
   an interrupted one resumes from its newest checkpoint.
3. **curves** — every intermediate checkpoint evaluated on the shapes set (six GenEval
   categories), all targets 1, ω = ``study.guidance_scale``; **final** — the last checkpoint on a
   larger prompt set for the comparison table.
4. **tts** — best-of-N for MIRO and the baseline (the first seed of each), selecting by each reward.
5. **sweeps** — ``study.target_reward``'s target 0 → 1 (others 1) and the ω grid, on MIRO's first seed;
   then the guidance-schedule points of ``study.guidance_schedules`` (constant / interval / damped ω)
   on the same run. The reward-hacking monitor (:mod:`miroflow.hacking`) runs over every run's
   convergence evaluations and both sweep grids; the judge floor (:mod:`miroflow.judge_floor`) is
   computed once at the study's resolution.
6. **report** — figures, ``results.md`` with the claims judged from the numbers, everything also
   logged to MLflow (experiment ``study.experiment``: one parent run, one child per training run,
   per best-of-N model, per run's evaluations and per sweep point).

Modules: :mod:`~miroflow.study.config` (``study.yaml``, the validated plan),
:mod:`~miroflow.study.runner` (the stages), :mod:`~miroflow.study.run` (:func:`run_study`),
:mod:`~miroflow.study.report` (claims, speed-ups, figures, ``results.md``), :mod:`~miroflow.study.machine`
(threads, CPU).

Artifacts live under ``<storage.root>/study/<size>/`` (shards, scores, runs, eval, tts, sweeps,
``study.json``); the local manifests DVC-style stages need are under ``<that dir>/manifests`` for
a local root (``work/study/<size>/manifests`` otherwise).
"""

from miroflow.study.config import (
    PlannedRun,
    RunSpec,
    SizeSpec,
    StudyConfig,
    StudyPlan,
    load_study_config,
    validate_study,
)
from miroflow.study.machine import choose_threads
from miroflow.study.report import budget_line, judge_claims, speedup
from miroflow.study.run import run_study

__all__ = [
    "PlannedRun",
    "RunSpec",
    "SizeSpec",
    "StudyConfig",
    "StudyPlan",
    "budget_line",
    "choose_threads",
    "judge_claims",
    "load_study_config",
    "run_study",
    "speedup",
    "validate_study",
]
