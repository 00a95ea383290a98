"""``validate_study`` refuses a study that cannot run, with one ``study.<key>: problem`` line each,
and plans a valid one (every config derived with the recipes, seeds taken from the specs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from miroflow.config import Params, ParamsError, apply_overrides, load_params
from miroflow.study import RunSpec, SizeSpec, StudyConfig, load_study_config, run_study, validate_study

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def params(tmp_path: Path) -> Params:
    return apply_overrides(
        load_params(REPO / "params.yaml"), [f"storage.root={tmp_path / 'store'}", "tracking.enabled=false"]
    )


def _problems(cfg: StudyConfig, params: Params, size: str = "quick") -> list[str]:
    with pytest.raises(ParamsError) as err:
        validate_study(cfg, params, size)
    return err.value.problems


def _runs(*specs: dict[str, object]) -> list[RunSpec]:
    return [RunSpec.model_validate(s) for s in specs]


BASE = {"name": "baseline", "role": "baseline", "rewards": [], "seeds": [3, 4]}
MIRO = {"name": "miro", "role": "miro", "rewards": None, "seeds": [3, 4]}


def test_the_repository_study_plans(params: Params) -> None:
    cfg = load_study_config(REPO / "study.yaml")
    plan = validate_study(cfg, params, "quick")
    assert [r.name for r in plan.runs] == [
        "baseline-s0",
        "miro-s0",
        "sharpness-only-s0",
        "alignment-only-s0",
        "miro-syn50-s0",
        "baseline-s1",
        "miro-s1",
    ]
    syn = plan.run("miro-syn50-s0").params.train
    assert syn.rewards is None and syn.synthetic_caption_prob == 0.5 and syn.seed == 0
    assert plan.run("baseline-s1").params.train.rewards == [] and plan.run("baseline-s1").params.train.seed == 1
    assert plan.run("sharpness-only-s0").params.train.rewards == ["sharpness"]
    assert plan.tts_runs == {"miro": "miro-s0", "baseline": "baseline-s0"} and plan.sweep_run == "miro-s0"
    assert plan.root.endswith("study/quick") and plan.params.train.keep_last == 100000
    assert plan.curve.eval.prompt_set == "shapes:1" and plan.tts.sweep.best_of_n == cfg.best_of_n
    assert [x for x, _ in plan.target_points] == cfg.target_values
    assert plan.target_points[0][1].eval.reward_targets == {cfg.target_reward: 0.0}
    assert not (Path(plan.root)).exists()  # planning does no work


def test_first_seed_not_zero(params: Params) -> None:
    cfg = StudyConfig(
        runs=_runs(BASE, MIRO, {"name": "sp", "role": "specialist", "rewards": ["sharpness"], "seeds": [3]})
    )
    plan = validate_study(cfg, params, "quick")
    assert plan.tts_runs == {"miro": "miro-s3", "baseline": "baseline-s3"}
    assert [r.name for r in plan.runs] == ["baseline-s3", "miro-s3", "sp-s3", "baseline-s4", "miro-s4"]


def test_unknown_size(params: Params) -> None:
    assert _problems(StudyConfig(), params, "huge") == [
        "study.sizes: study size 'huge' is not in study.yaml sizes: default, quick"
    ]


def test_bad_size_overrides(params: Params) -> None:
    cfg = StudyConfig(sizes={"quick": SizeSpec(overrides=["train.stepz=3", "train.lr=-1"])})
    lines = _problems(cfg, params)
    assert any(line.startswith("study.sizes.quick.overrides: train.stepz") for line in lines)
    assert any(line.startswith("study.sizes.quick.overrides: train.lr") for line in lines)
    assert _problems(StudyConfig(sizes={"quick": SizeSpec(overrides=["no-equals"])}), params) == [
        "study.sizes.quick.overrides: no-equals: expected KEY=VALUE"
    ]


def test_every_problem_is_named(params: Params) -> None:
    cfg = StudyConfig(
        runs=_runs(
            {"name": "a", "role": "specialist", "rewards": ["sharpnes"]},
            {"name": "a", "role": "specialist", "rewards": None, "seeds": [1, 1]},
            {"name": "b", "role": "baseline", "rewards": None},
        ),
        target_reward="aesthetic",
        target_values=[0.0, 1.5],
        guidance_scales=[-1.0, 0.5],
        best_of_n=[0, 2],
    )
    lines = _problems(cfg, params)
    expected = [
        "study.runs: no run with role miro",
        "study.runs.0.rewards: ['sharpnes'] not in score.rewards",
        "study.runs.1.name: duplicate run name 'a' (also study.runs.0)",
        "study.runs.1.seeds: duplicate seed(s) [1]",
        "study.runs.1.rewards: a specialist run needs its reward(s)",
        "study.runs.2.rewards: a baseline run has no reward conditioning",
        "study.target_reward: 'aesthetic' is not in score.rewards",
        "study.target_values: targets must lie in [0, 1], got [1.5]",
        "study.guidance_scales: ω must be >= 0, got [-1.0]",
        "study.best_of_n: N must be >= 1, got [0]",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert len(lines) == len(expected)
    assert all(line.startswith("study.") for line in lines)


def test_no_baseline_and_target_not_in_the_swept_miro(params: Params) -> None:
    cfg = StudyConfig(runs=_runs({"name": "m", "role": "miro", "rewards": ["noise"]}))
    assert _problems(cfg, params) == [
        "study.runs: no run with role baseline (the claims compare MIRO with its baseline)",
        "study.target_reward: 'sharpness' is not a reward of the MIRO run 'm' that the target sweep evaluates",
    ]


def test_judge_reward_is_required(params: Params) -> None:
    p = apply_overrides(params, ["score.rewards=[sharpness, noise]"])
    lines = _problems(StudyConfig(runs=_runs(BASE, MIRO)), p)
    assert len(lines) == 1 and lines[0].startswith("study: score.rewards must include shapes_alignment")


def test_run_study_refuses_before_any_work(params: Params, tmp_path: Path) -> None:
    cfg = StudyConfig(runs=_runs(BASE, {**MIRO, "rewards": ["sharpnes"]}))
    with pytest.raises(ParamsError, match=r"study.runs.1.rewards: \['sharpnes'\] not in score.rewards"):
        run_study(params, "quick", out_dir=tmp_path / "docs", study_config=cfg)
    store = tmp_path / "store"
    assert not (store / "study" / "quick" / "runs").exists() and not store.exists()
    assert not (tmp_path / "docs").exists()
