"""The typed ``study.yaml`` and the plan of one study size, validated before any work.

:func:`load_study_config` reads the ``study:`` section (unknown keys are errors);
:func:`validate_study` turns it, the project params and a size into a :class:`StudyPlan` — every
training run's and every evaluation's :class:`~miroflow.config.Params`, derived with
:mod:`miroflow.recipes` — or refuses the study with one ``study.<key>: problem`` line per
problem, before any data is rendered or any model trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from miroflow.config import Params, ParamsError, apply_overrides, format_validation_error
from miroflow.recipes import baseline_of, derive, miro_of, specialist_of, synthetic_of
from miroflow.storage import join_uri, parse_uri

__all__ = [
    "RunSpec",
    "ScheduleSpec",
    "SizeSpec",
    "StudyConfig",
    "PlannedRun",
    "StudyPlan",
    "load_study_config",
    "validate_study",
    "JUDGE_SELECT_BY",
]

#: The reward that best-of-N selects by for the judge-accuracy row (the shapes judge's own score).
JUDGE_SELECT_BY = "shapes_alignment"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSpec(_Model):
    """One training run of the study (trained once per seed)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Run label; checkpoints under runs/<name>-s<seed>.")
    role: Literal["baseline", "miro", "specialist", "synthetic"] = Field(
        description="What the run stands for in the claims."
    )
    rewards: list[str] | None = Field(
        default=None, description="train.rewards: [] = baseline, null = every scored reward."
    )
    synthetic_caption_prob: float = Field(default=0.0, ge=0, le=1, description="train.synthetic_caption_prob.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="train.seed values.")


class SizeSpec(_Model):
    """Everything that differs between ``default`` and ``quick``."""

    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides of params for the study.")
    eval_every: int = Field(
        default=300, ge=1, description="Checkpoint/evaluation interval in steps (convergence curves)."
    )
    curve_prompts_per_category: int = Field(default=8, ge=1)
    curve_images_per_prompt: int = Field(default=2, ge=1)
    final_prompts_per_category: int = Field(default=16, ge=1)
    final_images_per_prompt: int = Field(default=4, ge=1)
    eval_steps: int = Field(default=25, ge=1, description="Euler steps of every evaluation.")
    tts_prompts_per_category: int = Field(default=4, ge=1)
    sweep_prompts_per_category: int = Field(default=8, ge=1)
    sweep_images_per_prompt: int = Field(default=2, ge=1)
    budget_min: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Wall-time budget (minutes) of one run from scratch on a 2-core CI-class machine; the report says whether "
            "the first from-scratch invocation met it."
        ),
    )


class ScheduleSpec(_Model):
    """One point of the guidance-schedule sweep (``MiroPipeline`` guidance schedules, docs/design.md)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Point label; evaluated under sweeps/schedule-<name>.")
    guidance_scale: float = Field(ge=0, description="The nominal ω.")
    schedule: Literal["constant", "interval", "damped"] = Field(
        default="constant", description="eval.guidance_schedule."
    )
    interval: tuple[float, float] = Field(default=(0.0, 1.0), description="eval.guidance_interval [t_lo, t_hi].")
    decay: Literal["linear", "cosine"] = Field(default="linear", description="eval.guidance_decay.")

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"[{v[0]}, {v[1]}] must satisfy 0 <= t_lo < t_hi <= 1 (flow time, 1 = noise)")
        return v


def _default_schedules() -> list[ScheduleSpec]:
    return [
        ScheduleSpec(name="omega0", guidance_scale=0.0),
        ScheduleSpec(name="constant", guidance_scale=1.0),
        ScheduleSpec(name="interval-0-0.5", guidance_scale=1.0, schedule="interval", interval=(0.0, 0.5)),
        ScheduleSpec(name="interval-0.25-0.75", guidance_scale=1.0, schedule="interval", interval=(0.25, 0.75)),
        ScheduleSpec(name="damped-linear", guidance_scale=1.0, schedule="damped", decay="linear"),
    ]


def _default_runs() -> list[RunSpec]:
    return [
        RunSpec(name="baseline", role="baseline", rewards=[], seeds=[0, 1]),
        RunSpec(name="miro", role="miro", rewards=None, seeds=[0, 1]),
        RunSpec(name="sharpness-only", role="specialist", rewards=["sharpness"]),
        RunSpec(name="alignment-only", role="specialist", rewards=["shapes_alignment"]),
        RunSpec(name="miro-syn50", role="synthetic", rewards=None, synthetic_caption_prob=0.5),
    ]


class StudyConfig(_Model):
    """The ``study:`` section of ``study.yaml``."""

    experiment: str = "miroflow-study"
    threads: int | Literal["auto"] = "auto"
    eval_seed: int = 0
    guidance_scale: float = Field(default=0.0, ge=0)
    runs: list[RunSpec] = Field(default_factory=_default_runs, min_length=1)
    target_reward: str = "sharpness"
    target_values: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=2)
    guidance_scales: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0], min_length=1)
    best_of_n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    guidance_schedules: list[ScheduleSpec] = Field(
        default_factory=_default_schedules,
        description="Guidance-schedule sweep on the MIRO run; [] = none. The report's question needs a constant "
        "ω = 0 point (the reference) and a constant ω > 0 point (the full-guidance gain).",
    )
    sizes: dict[str, SizeSpec] = Field(default_factory=lambda: {"default": SizeSpec(), "quick": SizeSpec()})
    notes: dict[str, list[str]] = Field(
        default_factory=dict, description="Analysis paragraphs per size, copied into results.md."
    )


def load_study_config(path: str | Path | None = "study.yaml") -> StudyConfig:
    """Load the ``study:`` section of ``path`` (a missing default ``study.yaml`` = built-in defaults).

    Raises:
        ParamsError: unknown keys or bad values, one ``study.<key>: message`` line each.
    """
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(doc, dict):
            raise ParamsError(str(path), ["<root>: expected a mapping"])
        if set(doc) - {"study"}:
            raise ParamsError(str(path), [f"{k}: unknown key (only 'study:' is allowed)" for k in set(doc) - {"study"}])
        raw = doc.get("study") or {}
    elif path is not None and str(path) != "study.yaml":
        raise ParamsError(str(path), ["<file>: not found"])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(str(path), [f"study.{line}" for line in format_validation_error(err)]) from None


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlannedRun:
    """One training run: its spec, seed, checkpoint name ``<name>-s<seed>`` and derived params."""

    spec: RunSpec
    seed: int
    name: str
    params: Params


@dataclass(frozen=True)
class StudyPlan:
    """Everything one study size will do, derived and validated up front.

    ``runs`` are in seed-major order (every run's first seed, then the second seeds), so a partial
    study is informative. ``tts_runs`` names the MIRO and baseline runs of best-of-N (each the first
    seed of the first spec of that role); the sweeps use ``tts_runs["miro"]``.
    """

    size: str
    cfg: StudyConfig
    sz: SizeSpec
    root: str
    manifests: Path
    params: Params
    steps: int
    rewards: tuple[str, ...]
    runs: tuple[PlannedRun, ...]
    tts_runs: Mapping[str, str]
    curve: Params
    final: Params
    tts: Params
    target_points: tuple[tuple[float, Params], ...]
    guidance_points: tuple[tuple[float, Params], ...]
    schedule_points: tuple[tuple[ScheduleSpec, Params], ...] = ()

    @property
    def sweep_run(self) -> str:
        """The MIRO run the target and ω sweeps evaluate."""
        return self.tts_runs["miro"]

    def run(self, name: str) -> PlannedRun:
        """The planned run called ``name``."""
        return next(r for r in self.runs if r.name == name)


def _study_params(params: Params, cfg: StudyConfig, size: str, sz: SizeSpec) -> tuple[Params, int, str, Path]:
    """The size's overrides, then the study's own paths and checkpoint schedule.

    Raises:
        ParamsError: an invalid override (``study.sizes.<size>.overrides: ...`` lines).
    """
    try:
        p = apply_overrides(params, list(sz.overrides))
    except ParamsError as err:
        raise ParamsError("study", [f"study.sizes.{size}.overrides: {line}" for line in err.problems]) from None
    root = join_uri(p.storage.root, "study", size)
    uri = parse_uri(root)
    local = uri.path if uri.kind == "file" else None
    manifests = (local if local is not None else Path("work/study") / size) / "manifests"
    p = derive(
        p,
        storage={"root": root},
        data={"manifest": str(manifests / "shards.json")},
        score={"manifest": str(manifests / "scores.json"), "bins": str(manifests / "bins.json")},
        train={"checkpoint_every": sz.eval_every, "eval_every": sz.eval_every, "keep_last": 100000},
        tracking={"experiment": cfg.experiment, "register_model": None},
    )
    return p, p.train.steps, root, manifests


def _run_params(base: Params, spec: RunSpec, seed: int, name: str) -> Params:
    """The params of one run, from its role's recipe (``train.seed`` and the caption mix on top)."""
    if spec.role == "baseline":
        p = baseline_of(base, name)
    elif spec.role == "specialist" and spec.rewards is not None and len(spec.rewards) == 1:
        p = specialist_of(base, spec.rewards[0], name)
    elif spec.rewards is None:
        p = miro_of(base, name)
    else:
        p = derive(base, train={"run_name": name, "rewards": list(spec.rewards)})
    if spec.role == "synthetic":
        p = synthetic_of(p, spec.synthetic_caption_prob, name)
    return derive(p, train={"seed": seed, "synthetic_caption_prob": spec.synthetic_caption_prob})


def _eval_params(
    base: Params,
    cfg: StudyConfig,
    sz: SizeSpec,
    prompts_per_category: int,
    images: int,
    guidance: float | None = None,
    targets: Mapping[str, float] | None = None,
) -> Params:
    """Every evaluation of the study: the shapes set, ``eval_steps`` steps, ``eval_seed``, all rewards."""
    return derive(
        base,
        eval={
            "prompt_set": f"shapes:{prompts_per_category}",
            "num_prompts": None,
            "images_per_prompt": images,
            "steps": sz.eval_steps,
            "guidance_scale": cfg.guidance_scale if guidance is None else guidance,
            "reward_targets": dict(targets or {}),
            "negative_reward_targets": {},
            "rewards": list(base.score.rewards),
            "seed": cfg.eval_seed,
        },
    )


def _check_runs(cfg: StudyConfig, rewards: Sequence[str]) -> list[str]:
    """Problems of ``study.runs`` that need no derived params: roles, names, seeds, reward names."""
    problems: list[str] = []
    roles = {r.role for r in cfg.runs}
    problems += [
        f"study.runs: no run with role {role} (the claims compare MIRO with its baseline)"
        for role in ("baseline", "miro")
        if role not in roles
    ]
    seen: dict[str, int] = {}
    for i, spec in enumerate(cfg.runs):
        if spec.name in seen:
            problems.append(
                f"study.runs.{i}.name: duplicate run name {spec.name!r} (also study.runs.{seen[spec.name]})"
            )
        seen.setdefault(spec.name, i)
        dup = sorted({s for s in spec.seeds if spec.seeds.count(s) > 1})
        if dup:
            problems.append(f"study.runs.{i}.seeds: duplicate seed(s) {dup}")
        if spec.role == "baseline" and spec.rewards != []:
            problems.append(f"study.runs.{i}.rewards: a baseline run has no reward conditioning (rewards: [])")
        if spec.role == "specialist" and not spec.rewards:
            problems.append(f"study.runs.{i}.rewards: a specialist run needs its reward(s), a list of score.rewards")
        unknown = [r for r in spec.rewards or [] if r not in rewards]
        if unknown:
            problems.append(f"study.runs.{i}.rewards: {unknown} not in score.rewards ({', '.join(rewards)})")
    return problems


def _check_grids(cfg: StudyConfig, rewards: Sequence[str]) -> list[str]:
    """Problems of the sweep and best-of-N grids."""
    problems: list[str] = []
    if cfg.target_reward not in rewards:
        problems.append(f"study.target_reward: {cfg.target_reward!r} is not in score.rewards ({', '.join(rewards)})")
    miro = next((r for r in cfg.runs if r.role == "miro"), None)
    if miro is not None and miro.rewards is not None and cfg.target_reward not in miro.rewards:
        problems.append(
            f"study.target_reward: {cfg.target_reward!r} is not a reward of the MIRO run {miro.name!r} "
            "that the target sweep evaluates"
        )
    bad = [v for v in cfg.target_values if not 0.0 <= v <= 1.0]
    if bad:
        problems.append(f"study.target_values: targets must lie in [0, 1], got {bad}")
    bad = [w for w in cfg.guidance_scales if w < 0]
    if bad:
        problems.append(f"study.guidance_scales: ω must be >= 0, got {bad}")
    names = [s.name for s in cfg.guidance_schedules]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"study.guidance_schedules: duplicate point name(s) {dup}")
    bad_n = [n for n in cfg.best_of_n if n < 1]
    if bad_n:
        problems.append(f"study.best_of_n: N must be >= 1, got {bad_n}")
    if JUDGE_SELECT_BY not in rewards:
        problems.append(
            f"study: score.rewards must include {JUDGE_SELECT_BY} (best-of-N's judge-accuracy row "
            f"selects by it); score.rewards is [{', '.join(rewards)}]"
        )
    return problems


def validate_study(cfg: StudyConfig, params: Params, size: str) -> StudyPlan:
    """Refuse a study that cannot run, before any data or training work; else its :class:`StudyPlan`.

    Checks: the size exists; its overrides are valid params; ``score.rewards`` is not empty and
    includes the judge's reward; there is a ``baseline`` and a ``miro`` run; run names and seeds
    are unique (so are the checkpoint names ``<name>-s<seed>``); a baseline has ``rewards: []``,
    a specialist has rewards; every run's rewards and ``target_reward`` are in ``score.rewards``
    (and ``target_reward`` is a reward of the swept MIRO run); targets lie in ``[0, 1]``, ω ≥ 0,
    every best-of-N ``N ≥ 1``; and every derived training and evaluation config validates.

    Raises:
        ParamsError: one ``study.<key>: problem`` line per problem.
    """
    if size not in cfg.sizes:
        raise ParamsError(
            "study", [f"study.sizes: study size {size!r} is not in study.yaml sizes: {', '.join(cfg.sizes)}"]
        )
    sz = cfg.sizes[size]
    base, steps, root, manifests = _study_params(params, cfg, size, sz)
    rewards = tuple(base.score.rewards)
    problems = [] if rewards else ["study: score.rewards is empty (nothing to condition on or to report)"]
    problems += _check_runs(cfg, rewards) + _check_grids(cfg, rewards)
    depth = max(len(spec.seeds) for spec in cfg.runs)
    order = [(i, spec, spec.seeds[k]) for k in range(depth) for i, spec in enumerate(cfg.runs) if k < len(spec.seeds)]
    names = [f"{spec.name}-s{seed}" for _, spec, seed in order]  # unique when names and seeds are
    if problems:
        raise ParamsError("study", problems)

    runs: list[PlannedRun] = []
    for (i, spec, seed), name in zip(order, names):
        try:
            runs.append(PlannedRun(spec, seed, name, _run_params(base, spec, seed, name)))
        except (ParamsError, ValueError) as err:
            lines = err.problems if isinstance(err, ParamsError) else [str(err)]
            problems += [f"study.runs.{i}: {line}" for line in lines]
    first = {role: next(s for s in cfg.runs if s.role == role) for role in ("miro", "baseline")}
    tts_runs = {role: f"{spec.name}-s{spec.seeds[0]}" for role, spec in first.items()}
    try:
        curve = _eval_params(base, cfg, sz, sz.curve_prompts_per_category, sz.curve_images_per_prompt)
        final = _eval_params(base, cfg, sz, sz.final_prompts_per_category, sz.final_images_per_prompt)
        tts = derive(
            _eval_params(base, cfg, sz, sz.tts_prompts_per_category, 1),
            sweep={"best_of_n": list(cfg.best_of_n), "select_by": JUDGE_SELECT_BY},
        )
        sp, si = sz.sweep_prompts_per_category, sz.sweep_images_per_prompt
        targets = tuple(
            (x, _eval_params(base, cfg, sz, sp, si, targets={cfg.target_reward: x})) for x in cfg.target_values
        )
        guidance = tuple((w, _eval_params(base, cfg, sz, sp, si, guidance=w)) for w in cfg.guidance_scales)
        schedules = tuple(
            (
                spec,
                derive(
                    _eval_params(base, cfg, sz, sp, si, guidance=spec.guidance_scale),
                    eval={
                        "guidance_schedule": spec.schedule,
                        "guidance_interval": list(spec.interval),
                        "guidance_decay": spec.decay,
                    },
                ),
            )
            for spec in cfg.guidance_schedules
        )
    except ParamsError as err:
        lines = [f"study.sizes.{size}: evaluation {line}" for line in err.problems]
        raise ParamsError("study", problems + lines) from None
    if problems:
        raise ParamsError("study", problems)
    return StudyPlan(
        size=size,
        cfg=cfg,
        sz=sz,
        root=root,
        manifests=manifests,
        params=base,
        steps=steps,
        rewards=rewards,
        runs=tuple(runs),
        tts_runs=tts_runs,
        curve=curve,
        final=final,
        tts=tts,
        target_points=targets,
        guidance_points=guidance,
        schedule_points=schedules,
    )
