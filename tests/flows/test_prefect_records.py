"""Prefect ↔ MLflow linked records: a tiny pipeline flow run under a real Prefect server, tracked on a real
MLflow server, tags its MLflow runs with the flow run, publishes a markdown and a table artifact, persists
its result as JSON, warns about warmup and logs the training loss to the run; DVC-stage and env tags."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from uuid import UUID

import pytest

from miroflow.config import load_params

TINY = [
    "data.num_samples=32",
    "data.shard_size=16",
    "score.rewards=[sharpness, contrast, shapes_alignment]",
    "score.num_bins=8",
    "train.steps=2",
    "train.batch_size=8",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.sample_steps=1",
    "train.warmup_steps=2",  # == steps: the flow warns
    "train.log_every=1",
    "train.run_name=records",
    "eval.prompt_set=shapes:1",
    "eval.images_per_prompt=1",
    "eval.steps=1",
    "tracking.experiment=records",
    "sweep.guidance_scales=[0.0]",  # the pipeline ends with a small sweep of the MIRO model
    "sweep.target_values=[0.0]",
    "sweep.best_of_n=[1,2]",
]


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [f"{logging.getLevelName(x.level)} {x.message}" for x in logs]


def test_pipeline_flow_run_is_linked_to_its_mlflow_runs(
    prefect_server: None, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import miro_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (tmp_path / "params.yaml").write_text("eval:\n  num_prompts: 2\n")  # the file's value must survive
    form = load_params(None, TINY)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        state = miro_pipeline(params=form, with_baseline=False, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    evaluated = out["runs"]["records"]["evaluate"]
    assert evaluated["n_images"] == 2  # eval.num_prompts=2 from params.yaml (the code default gives 6)
    assert Path(out["runs"]["records"]["train"]["checkpoint"]).is_absolute()

    # every MLflow run of the flow run carries its id, URL and flow name
    mlflow = MlflowClient(mlflow_server)
    exp = mlflow.get_experiment_by_name("records")
    assert exp is not None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run_id}'")
    train_id = out["runs"]["records"]["train"]["mlflow_run_id"]
    assert train_id in {r.info.run_id for r in runs} and evaluated["mlflow_run_id"] in {r.info.run_id for r in runs}
    for r in runs:
        assert r.data.tags["prefect.flow_name"] == "miro-pipeline"
        assert r.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{run_id}")
        assert "dvc.stage" not in r.data.tags

    # a markdown summary and a table of rewards, linked to the flow run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_type = {a.type: a for a in arts}
    assert set(by_type) >= {"markdown", "table"}, [a.type for a in arts]
    md = str(by_type["markdown"].data)
    assert train_id in md and mlflow_server in md
    assert str(tmp_path) in md  # absolute checkpoint / eval URIs
    assert "records reward-hacking flags" in md  # the monitor's verdict on the training run (docs/hacking.md)
    table = by_type["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert rows[0]["run"] == "records" and "reward/sharpness" in rows[0]
    assert rows[0]["judge_accuracy"] == round(evaluated["overall"], 4)

    # the result is persisted as JSON (no pickle) on the local filesystem
    stored = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert stored, "no persisted result"
    assert any('"runs"' in p.read_text(errors="replace") for p in stored)

    # warmup warning and the training loss, every log_every step, in the run's logs
    logs = _logs(run_id)
    assert any(x.startswith("WARNING") and "train.warmup_steps (2) >= train.steps (2)" in x for x in logs), logs
    assert sum("loss=" in x and x.startswith("INFO step ") for x in logs) >= 2, logs


def test_dvc_stage_and_env_tags(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from miroflow.tracking import default_run_tags, start_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DVC_STAGE", "train@miro")  # what `dvc repro` sets for a stage command
    monkeypatch.setenv("MIROFLOW_RUN_TAGS", '{"team": "vision"}')
    p = load_params(None, ["tracking.experiment=records-dvc"])
    with start_run(p, run_name="dvc", tags={"team": "explicit wins"}) as tracker, tracker.child_run("child") as child:
        pass
    client = MlflowClient(mlflow_server)
    for rid in (tracker.run_id, child.run_id):
        tags = client.get_run(rid).data.tags
        assert tags["dvc.stage"] == "train@miro"
        assert "prefect.flow_run_id" not in tags  # not in a flow run
    assert client.get_run(tracker.run_id).data.tags["team"] == "explicit wins"
    assert client.get_run(child.run_id).data.tags["team"] == "vision"

    monkeypatch.setenv("MIROFLOW_RUN_TAGS", "[not, json")  # bad input: a warning, never a failed run
    assert default_run_tags() == {"dvc.stage": "train@miro"}
