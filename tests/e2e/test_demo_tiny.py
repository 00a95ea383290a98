"""`miroflow demo` end to end at a tiny size: every stage runs, the sweep finds the MIRO checkpoint
(the demo's runs are content-addressed by their own params), and the demo's manifests stay out of
DVC's `manifests/`; tracked, it is one MLflow parent run with the stage runs under it (a real SQLite store)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from miroflow import stages
from miroflow import tracking as T
from miroflow.compare import resolve_run
from miroflow.config import Params


def test_tiny_demo_runs_every_stage_into_its_own_manifests(tmp_path: Path) -> None:
    params = Params.model_validate(
        {
            "data": {"num_samples": 64, "shard_size": 32},
            "score": {"num_bins": 8, "rewards": ["sharpness", "noise", "shapes_alignment"]},
            "train": {"batch_size": 16, "warmup_steps": 1, "sample_steps": 2},
            "eval": {"prompt_set": "shapes:1", "images_per_prompt": 1, "steps": 2},
            "storage": {"root": str(tmp_path / "store")},
            "tracking": {"enabled": False},
        }
    )
    lines: list[str] = []
    out = stages.demo(params, steps=3, echo=lines.append, manifests=str(tmp_path / "demo-manifests"))
    assert [r.steps for r in out.runs] == [3, 3]
    assert out.sweep.points and Path(out.sweep.output).is_dir()
    assert "/runs/demo-miro-" in out.runs[1].checkpoint
    written = {p.name for p in (tmp_path / "demo-manifests").glob("*.json")}
    assert {"shards.json", "scores.json", "bins.json", "train-demo-miro.json", "sweep-demo-miro.json"} <= written
    assert any(line.startswith("[sweep] demo-miro") for line in lines)


def _tiny(tmp_path: Path, **tracking: object) -> Params:
    return Params.model_validate(
        {
            "data": {"num_samples": 64, "shard_size": 32},
            "score": {"num_bins": 8, "rewards": ["sharpness", "noise", "shapes_alignment"]},
            "train": {"batch_size": 16, "warmup_steps": 1, "sample_steps": 2},
            "eval": {"prompt_set": "shapes:1", "images_per_prompt": 1, "steps": 2},
            "storage": {"root": str(tmp_path / "store")},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "demo-test", **tracking},
        }
    )


def test_tracked_demo_is_one_parent_run_with_the_stage_runs_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines: list[str] = []
    out = stages.demo(
        _tiny(tmp_path, register_model="demo-shapes"), steps=3, echo=lines.append, manifests=str(tmp_path / "m")
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("demo-test")
    assert exp is not None and exp.tags[T.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI view
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=500)}
    parents = [r for r in runs.values() if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    assert (
        re.fullmatch(r"demo-3steps-[0-9a-f]{6}", parents[0].info.run_name)
        and f"[demo] MLflow parent run {pid}" in lines
    )
    assert "mlflow.parentRunId" not in parents[0].data.tags

    def parent_of(run_id: str | None) -> str | None:
        assert run_id is not None
        return runs[run_id].data.tags.get("mlflow.parentRunId")

    train_ids = [r.mlflow_run_id for r in out.runs]
    assert [parent_of(t) for t in train_ids] == [pid, pid]  # stage runs under the pipeline's parent
    assert [parent_of(e.mlflow_run_id) for e in out.evals] == train_ids  # evaluations under their training run
    sweeps = [r for r in runs.values() if r.data.tags.get("stage") == "sweep"]
    assert len(sweeps) == 1 and parent_of(sweeps[0].info.run_id) == train_ids[1]
    top = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [pid]  # nothing else is top-level

    # names: unique and descriptive; the plain name stays a tag (what `miroflow compare NAME` matches)
    miro = runs[train_ids[1]]
    assert re.fullmatch(r"train-demo-miro-3steps-[0-9a-f]{6}", miro.info.run_name)
    assert miro.data.tags[T.RUN_NAME_TAG] == "demo-miro" and T.run_label(miro) == "demo-miro"
    names = [r.info.run_name for r in runs.values() if r.data.tags.get("stage")]
    assert len(names) == len(set(names))
    # params: the sections of the stage, the whole config as params.yaml
    assert "train.lr" in miro.data.params and not any(k.startswith(("eval.", "tracking.")) for k in miro.data.params)
    ev = runs[out.evals[1].mlflow_run_id]
    assert {k.split(".")[0] for k in ev.data.params} <= {"eval", "train", "git_commit", "data_manifest_sha256"}
    assert "eval.steps" in ev.data.params and "train.lr" not in ev.data.params
    with tempfile.TemporaryDirectory() as tmp:
        doc = yaml.safe_load(Path(client.download_artifacts(ev.info.run_id, "params.yaml", tmp)).read_text())
        assert doc["tracking"]["parent_run_id"] == pid and doc["train"]["run_name"] == "demo-miro"
        # the training grid from step 0: each 32 px sample upscaled 4x with its prompt under it
        frames = [a.path for a in client.list_artifacts(miro.info.run_id, "images") if a.path.endswith(".png")]
        assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in frames) == [0, 1, 2, 3]  # sized(): every step
        first = next(p for p in frames if "+step+0+" in p)
        grid = np.asarray(Image.open(client.download_artifacts(miro.info.run_id, first, tmp)))
        n = len(doc["train"]["sample_prompts"])
        assert grid.shape[1] == n * (128 + 4) + 4 and grid.shape[0] > 128 + 8
        # the evaluation as tables and a bar plot
        arts = {a.path for a in client.list_artifacts(ev.info.run_id, "eval")}
        assert {"eval/accuracy_table.json", "eval/rewards_table.json", "eval/summary.png"} <= arts
        table = json.loads(Path(client.download_artifacts(ev.info.run_id, "eval/rewards_table.json", tmp)).read_text())
        assert table["columns"] == ["reward", "mean", "std", "n", "se"] and len(table["data"]) == 3
    # a name still resolves to its newest run
    assert resolve_run(client, "demo-miro", "demo-test").info.run_id == train_ids[1]
    # each training run carries its final evaluation; its registered version is tagged with the accuracy
    for t, e in zip(train_ids, out.evals):
        assert t is not None and e.overall is not None
        tr = client.get_run(t)
        assert (
            tr.data.metrics["eval/overall"] == pytest.approx(e.overall)
            and tr.data.tags["eval.run_id"] == e.mlflow_run_id
        )
        assert [m.step for m in client.get_metric_history(t, "eval/overall")] == [3]
        (mv,) = client.search_model_versions(f"run_id = '{t}'")
        assert mv.tags["eval_accuracy"] == f"{e.overall:.4f}" and mv.tags["eval_run_id"] == e.mlflow_run_id
        assert len(mv.tags["data_hash"]) >= 8 and mv.tags["kind"] in ("baseline", "miro")
        assert mv.tags["rewards"] == ("none" if mv.tags["kind"] == "baseline" else "sharpness,noise,shapes_alignment")
    # the demo ends with the comparison report of its two runs, logged under the demo's parent run
    assert out.compare is not None and out.compare == str(tmp_path / "compare" / "report.md")
    doc = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["demo-baseline", "demo-miro"]
    assert [r["train_run_id"] for r in doc["runs"]] == train_ids  # the training runs, not the demo's parent
    assert [r["eval_run_id"] for r in doc["runs"]] == [e.mlflow_run_id for e in out.evals]
    (overall,) = [row for row in doc["table"] if row["metric"] == "eval/overall"]
    assert all(v["se"] is not None and v["n"] > 0 for v in overall["runs"].values())  # SEs from the eval samples
    assert any(line.startswith("[compare] demo-baseline vs demo-miro") for line in lines)
    (cmp_run,) = [r for r in runs.values() if r.data.tags.get("stage") == "compare"] or [None]
    assert cmp_run is not None and parent_of(cmp_run.info.run_id) == pid


def test_demo_with_an_unknown_parent_run_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny(tmp_path, parent_run_id="0123456789abcdef0123456789abcdef")
    with pytest.raises(
        T.TrackingError, match=r"tracking\.parent_run_id: no MLflow run '0123456789abcdef0123456789abcdef'"
    ):
        stages.demo(params, steps=3, manifests=str(tmp_path / "m"))
    assert not (tmp_path / "store").exists() and not (tmp_path / "m").exists()  # nothing was prepared
