"""``miroflow tune-targets`` end to end on a tiny saved model: a real MLflow server, a real Optuna SQLite study.

The first run goes through the stage entry point with the model already loaded; the rerun goes
through the CLI (``--trials 4``) and must resume the same study (trials accumulate). Bad inputs are
one-line errors naming the key. The statistics and naming helpers are checked on hand-made cases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from miroflow.cli import app
from miroflow.config import Params
from miroflow.pipeline import load_pipeline
from miroflow.prompts import PromptItem, load_prompt_set
from miroflow.results import TuneResult
from miroflow.storage import Storage
from miroflow.tune_space import SearchSpace, default_storage_url, study_name, write_prompt_subset
from miroflow.tune_stage import tune_targets
from miroflow.tune_stats import objective_value, paired_difference, prompt_values, t_interval
from tests.tiny_models import tiny_random_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
SCORED = ["sharpness", "contrast", "compressibility", "shapes_alignment"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random MIRO pipeline saved in the checkpoint layout."""
    out = tmp_path_factory.mktemp("tune_ckpt") / "final"
    tiny_random_pipeline(REWARDS, "tiny-tune", 3).save_pretrained(out)
    return str(out)


def _params(tmp: Path, checkpoint: str, tracking: bool = True, **tune: Any) -> Params:
    t: dict[str, Any] = {
        "objective": "reward:compressibility",
        "trials": 3,
        "startup_trials": 1,
        "search_prompts": 2,
        "heldout_prompts": 3,
        "guidance_range": [0.0, 1.0],
        "storage": f"sqlite:///{tmp / 'optuna.db'}",
    }
    t.update(tune)
    return Params.model_validate(
        {
            "data": {"manifest": str(tmp / "manifests" / "shards.json")},
            "eval": {
                "checkpoint": checkpoint,
                "prompt_set": "shapes:1",
                "images_per_prompt": 2,
                "steps": 2,
                "batch_size": 8,
                "seed": 1,
                "rewards": SCORED,
            },
            "tune": t,
            "storage": {"root": str(tmp / "store")},
            "tracking": {"experiment": "tune-test", "enabled": tracking},
        }
    )


def _write(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude_unset=True)))
    return path


def _rows(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines() if line.strip()]


def test_tune_targets_e2e_mlflow_children_optuna_resume_and_heldout(
    mlflow_server: str, checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = _params(tmp_path, checkpoint)
    manifest = tmp_path / "manifests" / "tune-tiny-tune.json"
    r = tune_targets(params, pipeline=load_pipeline(checkpoint))
    assert r.manifest == str(manifest) and TuneResult.from_json(manifest.read_text()) == r
    assert (r.n_trials, r.new_trials) == (3, 3)
    assert r.study_name.startswith("tiny-tune-reward-compressibility-")
    out = Path(r.output)
    assert out == tmp_path / "store" / "tune" / r.study_name

    # ---- MLflow: one parent, one child per trial, two held-out children, plots on the parent
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tune-test")
    assert exp is not None and r.parent_run_id
    parent = client.get_run(r.parent_run_id)
    assert parent.data.tags["miroflow.run_name"] == "tune-tiny-tune" and parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{r.parent_run_id}'")
    trial_runs = {c.info.run_name: c for c in children if c.data.tags.get("tune.kind") == "trial"}
    assert sorted(trial_runs) == ["trial-0000", "trial-0001", "trial-0002"]
    assert sorted(c.info.run_name for c in children if c.data.tags.get("tune.kind") == "heldout") == [
        "heldout-best",
        "heldout-default",
    ]
    assert all(c.info.status == "FINISHED" for c in children)
    artifacts = {a.path for a in client.list_artifacts(r.parent_run_id, "plots")}
    assert {"plots/objective.png", "plots/importances.png", "plots/heldout.png"} <= artifacts
    assert {"tune.json", "summary.md"} <= {a.path for a in client.list_artifacts(r.parent_run_id)}
    png = client.download_artifacts(r.parent_run_id, "plots/importances.png", str(tmp_path / "dl"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = client.get_metric_history(r.parent_run_id, "tune/objective")
    assert sorted(m.step for m in history) == [0, 1, 2]

    # ---- Optuna storage: the trials, the default as trial 0, each linked to its MLflow child
    study = optuna.load_study(study_name=r.study_name, storage=params.tune.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    assert done[0].params == {
        "target.sharpness": 1.0,
        "target.contrast": 1.0,
        "target.shapes_alignment": 1.0,
        "guidance_scale": 0.0,
    }
    for t in done:
        run = trial_runs[f"trial-{t.number:04d}"]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["tune/objective"] == pytest.approx(t.value)
        # the objective is the evaluation's compressibility mean
        assert t.value == pytest.approx(run.data.metrics["eval/reward/compressibility"])
        assert json.loads(run.data.params["reward_targets"]).keys() == set(REWARDS)
    assert r.best["trial"] == study.best_trial.number and r.best["value"] == pytest.approx(study.best_value)
    assert r.default["trial"] == 0 and r.default["reward_targets"] == dict.fromkeys(REWARDS, 1.0)
    assert set(r.space["importances"]) == {  # type: ignore[arg-type]
        "target.sharpness",
        "target.contrast",
        "target.shapes_alignment",
        "guidance_scale",
    }

    # ---- held-out: both vectors with intervals, on prompts and seeds disjoint from the search
    h = r.heldout
    for kind in ("best", "default", "difference"):
        iv = h[kind]
        assert isinstance(iv, dict) and iv["n"] == 3 and iv["low"] is not None
        assert iv["low"] <= iv["mean"] <= iv["high"]
    for kind in ("best", "default"):
        assert h[kind]["objective"] == pytest.approx(h[kind]["mean"])  # type: ignore[index]
    diff = h["difference"]
    assert isinstance(diff, dict)
    assert diff["mean"] == pytest.approx(h["best"]["mean"] - h["default"]["mean"])  # type: ignore[index]
    assert r.beats_default == (diff["low"] > 0)
    search = [it.prompt for it in load_prompt_set(f"geneval:{out / 'prompts' / 'search.jsonl'}")]
    held = [it.prompt for it in load_prompt_set(f"geneval:{out / 'prompts' / 'heldout.jsonl'}")]
    shapes = [it.prompt for it in load_prompt_set("shapes:1")]
    assert search == shapes[:2] and held == shapes[2:5]
    trial_rows, held_rows = _rows(str(out / "trials" / "0001")), _rows(str(out / "heldout" / "best"))
    assert not {x["seed"] for x in trial_rows} & {x["seed"] for x in held_rows}
    assert [x["seed"] for x in held_rows] == [x["seed"] for x in _rows(str(out / "heldout" / "default"))]
    md = (out / "summary.md").read_text()
    assert "Held-out re-evaluation" in md and "best − default (paired)" in md
    assert json.loads((out / "tune.json").read_text())["study_name"] == r.study_name

    # ---- rerun through the CLI with a larger budget: the same study resumes, one new trial
    cfg = _write(params, tmp_path / "params.yaml")
    res = CliRunner().invoke(app, ["tune-targets", "--params", str(cfg), "--trials", "4"])
    assert res.exit_code == 0, res.output
    assert f"study {r.study_name}: 4 completed trials (1 new)" in res.output
    assert "best beats the all-ones default by more than the interval: " in res.output
    study = optuna.load_study(study_name=r.study_name, storage=params.tune.storage)
    assert [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE] == [0, 1, 2, 3]
    r2 = TuneResult.from_json(manifest.read_text())
    assert (r2.n_trials, r2.new_trials, r2.output) == (4, 1, r.output) and r2.parent_run_id != r.parent_run_id
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{r2.parent_run_id}'")
    assert sorted(c.info.run_name for c in kids if c.data.tags.get("tune.kind") == "trial") == ["trial-0003"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tune.rewards=[hpsv3]"], "tune preflight: tune.rewards: unknown reward 'hpsv3' (known: "),
        (["tune.objective=reward:nope"], "tune preflight: tune.objective: unknown reward 'nope' (known: accuracy, "),
        (
            ["tune.objective=mix", "tune.weights={accuracy: 1, noise: 2}"],
            "tune preflight: tune.weights: reward 'noise' is not scored by the evaluation (add it to eval.rewards)",
        ),
        (
            ["tune.rewards=[noise]"],
            "tune preflight: tune.rewards: 'noise' is not a reward of this model "
            "(its rewards: sharpness, contrast, shapes_alignment)",
        ),
        (
            ["tune.heldout_prompts=5"],
            "tune preflight: tune.heldout_prompts: eval.prompt_set 'shapes:1' has 6 prompts, fewer",
        ),
        (["tune.heldout_seed=1"], "tune preflight: tune.heldout_seed: 1 equals the search seed"),
        (["tune.objective=mix"], "tune.weights: Value error, needs at least one non-zero weight"),
    ],
)
def test_bad_inputs_are_one_line_errors_naming_the_key(
    checkpoint: str, tmp_path: Path, overrides: list[str], expected: str
) -> None:
    cfg = _write(_params(tmp_path, checkpoint, tracking=False), tmp_path / "params.yaml")
    args = ["tune-targets", "--params", str(cfg)]
    for o in overrides:
        args += ["-S", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "optuna.db").exists()  # refused before any study was opened


def test_objective_contributions_intervals_and_pairing() -> None:
    # category A: two prompts (1 right, 1 wrong), category B: one prompt (right); one reward with a NaN
    rows = [
        {"tag": "A", "prompt_index": 0, "seed": 10, "correct": True, "r": 0.2},
        {"tag": "A", "prompt_index": 1, "seed": 11, "correct": False, "r": 0.4},
        {"tag": "B", "prompt_index": 2, "seed": 12, "correct": True, "r": None},
    ]
    summary = {"overall": (0.5 + 1.0) / 2, "rewards": {"r": {"mean": 0.3}}}
    for weights in ({"accuracy": 1.0}, {"r": 1.0}, {"accuracy": 0.25, "r": -2.0}):
        _, v = prompt_values(rows, weights)
        assert v.mean() == pytest.approx(objective_value(summary, weights))
    _, v = prompt_values(rows, {"accuracy": 1.0})
    assert v.tolist() == pytest.approx([0.75, 0.0, 1.5])
    iv = t_interval(v, 0.95)
    half = 4.302652729911275 * np.std(v, ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert (iv.low, iv.high) == pytest.approx((v.mean() - half, v.mean() + half))
    assert t_interval([0.4]).low is None
    other = [{**x, "correct": True} for x in rows]
    d = paired_difference(other, rows, {"accuracy": 1.0})
    assert d.mean == pytest.approx(1.0 - 0.75)
    with pytest.raises(ValueError, match="differ in prompts or seeds"):
        paired_difference([{**rows[0], "seed": 99}, *rows[1:]], rows, {"accuracy": 1.0})
    assert objective_value({"overall": None, "rewards": {}}, {"accuracy": 1.0}) is None


def test_storage_url_study_name_and_prompt_subsets(tmp_path: Path) -> None:
    assert default_storage_url(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert default_storage_url("sqlite:///rel/dir/mlflow.db", cwd=tmp_path) == f"sqlite:///{tmp_path}/rel/dir/optuna.db"
    for uri in ("http://127.0.0.1:5000", "postgresql+psycopg2://u@db/mlflow", "sqlite:///:memory:"):
        assert default_storage_url(uri, cwd=tmp_path) == f"sqlite:///{tmp_path}/work/optuna.db"

    space = SearchSpace(("sharpness",), (0.0, 1.0), None, 0.0)
    items = load_prompt_set("shapes:1")[:2]
    p = Params.model_validate({"tune": {"trials": 5}})
    name = study_name(p, "m", "/ck", 3, space, items)
    assert name == study_name(
        p.model_copy(update={"tune": p.tune.model_copy(update={"trials": 50})}), "m", "/ck", 3, space, items
    )
    other = p.model_copy(update={"tune": p.tune.model_copy(update={"objective": "reward:sharpness"})})
    assert study_name(other, "m", "/ck", 3, space, items).startswith("m-reward-sharpness-")
    assert study_name(p, "m", "/ck2", 3, space, items) != name
    assert space.point(space.default_values()) == {"reward_targets": {"sharpness": 1.0}, "guidance_scale": 0.0}

    st = Storage()
    txt = [PromptItem("txt", "a dog", {"tag": "txt", "prompt": "a dog", "line": 1}), PromptItem("txt", "a cat", {})]
    parti = [PromptItem("Animals", "a fox", {"category": "Animals", "challenge": "Basic", "note": ""})]
    for subset in (items, txt, parti):
        spec = write_prompt_subset(st, str(tmp_path / "p" / "x"), subset)
        back = load_prompt_set(spec, storage=st)
        assert [(it.tag, it.prompt) for it in back] == [(it.tag, it.prompt) for it in subset]
