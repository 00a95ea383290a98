"""The stage commands end to end through the CLI, tracked by a real MLflow server.

prepare -> score -> bin -> embed -> train (MIRO, tiny) -> evaluate, in a temporary project dir.
Checks the acceptance facts of the training issue that need MLflow: sample grids by step,
per-reward curves, the checkpoint URI and a registered model version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from miroflow.cli import app
from miroflow.results import TrainResult

SETTINGS = [
    "-S",
    "data.num_samples=64",
    "-S",
    "data.shard_size=32",
    "-S",
    "train.steps=6",
    "-S",
    "train.batch_size=8",
    "-S",
    "train.eval_every=3",
    "-S",
    "train.checkpoint_every=3",
    "-S",
    "train.log_every=1",
    "-S",
    "train.sample_steps=2",
    "-S",
    "train.warmup_steps=2",
    "-S",
    "train.run_name=e2e-miro",
    "-S",
    "tracking.experiment=e2e-cli",
    "-S",
    "tracking.register_model=e2e-miro",
    "-S",
    "eval.prompt_set=shapes:1",
    "-S",
    "eval.images_per_prompt=1",
    "-S",
    "eval.steps=2",
]


@pytest.fixture()
def project(tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return tmp_path


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "-p", "none.yaml", *SETTINGS])
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result.output


def test_stages_through_cli_with_mlflow(project: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    (project / "none.yaml").write_text("{}\n")
    assert "prepared 64 samples" in _invoke("prepare")
    assert "scored 2 shards" in _invoke("score")
    assert "bins for" in _invoke("bin")
    assert "embedded 2 shards" in _invoke("embed")
    assert "manifest: manifests/train-e2e-miro.json" in _invoke("train")
    out = json.loads((project / "manifests" / "train-e2e-miro.json").read_text())
    assert TrainResult.from_dict(out).steps == 6  # the manifest is the stage's typed result
    assert out["steps"] == 6 and out["model_version"] == "1" and out["kind"] == "miro"
    assert re.search(r"/runs/e2e-miro-[0-9a-f]{10}/final$", out["checkpoint"]), out["checkpoint"]

    client = MlflowClient(mlflow_server)
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.tags["checkpoint_uri"].endswith("final") or "checkpoint_uri" in run.data.tags
    for name in ("sharpness", "noise", "contrast", "compressibility", "shapes_alignment"):
        hist = client.get_metric_history(run.info.run_id, f"reward/{name}")
        assert sorted(m.step for m in hist) == [0, 3, 6], name  # grids from step 0
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = {p.split("+step+")[1].split("+")[0] for p in images if "+step+" in p and p.endswith(".png")}
    assert steps == {"0", "3", "6"}, images
    assert client.get_model_version("e2e-miro", "1").run_id == run.info.run_id

    summary_text = _invoke("evaluate")
    summary = json.loads((project / "manifests" / "eval-e2e-miro.json").read_text())
    assert summary["mlflow_run_id"] and summary["manifest"] == "manifests/eval-e2e-miro.json"
    assert set(summary["accuracy"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert Path(summary["output"], "00000", "metadata.jsonl").exists()
    assert "overall" in summary_text


def test_bad_override_exits_with_named_key(project: Path) -> None:
    result = CliRunner().invoke(app, ["train", "-S", "train.steps=many"])
    assert result.exit_code == 2
    assert "train.steps" in result.output
