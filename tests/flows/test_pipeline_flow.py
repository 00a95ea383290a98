"""The whole-pipeline Prefect flow on a tiny shapes dataset under a temporary Prefect server (GPU stages in
process; dispatching them to deployments on work pools: tests/flows/test_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow.config import load_params


def test_pipeline_flow_runs_every_stage_and_resumes(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import miro_pipeline

    monkeypatch.chdir(tmp_path)
    p = load_params(
        None,
        [
            "data.num_samples=32",
            "data.shard_size=16",
            "score.rewards=[sharpness, contrast, shapes_alignment]",
            "score.num_bins=8",
            "train.steps=2",
            "train.batch_size=8",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.sample_steps=1",
            "train.warmup_steps=1",
            "train.run_name=flowtest",
            "eval.prompt_set=shapes:1",
            "eval.images_per_prompt=1",
            "eval.steps=1",
            "tracking.enabled=false",
            "sweep.guidance_scales=[0.0]",
            "sweep.target_values=[0.0]",
            "sweep.best_of_n=[1,2]",
        ],
    )
    out = miro_pipeline(params=p)
    assert out["data"]["shards"] == 2 and out["scores"]["scored"] == 2
    assert set(out["runs"]) == {"flowtest", "flowtest-baseline"}
    for name, r in out["runs"].items():
        assert r["train"]["steps"] == 2
        summary = json.loads(Path(r["evaluate"]["summary_uri"]).read_text())
        assert summary["n_images"] == 6, name
    # the sweep + best-of-N of the MIRO model (its own run folder)
    sweep = out["sweep"]
    assert [pt["name"] for pt in sweep["points"]] == [
        "guidance/omega=0",
        "target/sharpness=0",
        "best_of_n/n=1",
        "best_of_n/n=2",
    ]
    doc = json.loads(Path(sweep["sweep_json"]).read_text())
    assert doc["run_name"] == "flowtest" and "flowtest-baseline" not in doc["checkpoint"]
    again = miro_pipeline(params=p, with_sweep=False)
    assert again["scores"]["skipped"] == 2 and again["scores"]["scored"] == 0
    assert again["sweep"] is None
    for name, r in again["runs"].items():  # resumed: the finished trainings are not redone
        assert r["train"]["steps"] == 2 and r["train"]["checkpoint"] == out["runs"][name]["train"]["checkpoint"]


def test_pipeline_flow_names_a_missing_dispatch_deployment(prefect_server: None, tmp_path: Path) -> None:
    from flows.pipeline import miro_pipeline

    state = miro_pipeline(
        params_file=None,
        overrides=[f"storage.root={tmp_path / 'store'}", "train.steps=2", "data.num_samples=32"],
        dispatch="deployments",
        train_deployment="train/no-such-deployment",
        return_state=True,
    )
    assert state.is_failed()
    message = state.message or ""
    assert "train_deployment: deployment 'train/no-such-deployment' not found" in message, message
    assert not (tmp_path / "store").exists(), "it failed before any stage"


def test_pipeline_flow_rejects_bad_override(prefect_server: None) -> None:
    from flows.pipeline import miro_pipeline

    with pytest.raises(Exception, match="train.steps"):
        miro_pipeline(params_file="params.yaml", overrides=["train.steps=-1"])
