"""A small sweep against the real MLflow server: one parent run, one child per point, plots on the parent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from miroflow import stages
from miroflow.config import Params
from miroflow.content_keys import addressed
from miroflow.pipeline import MiroPipeline
from miroflow.results import SweepResult
from miroflow.sweep import plan_points, run_sweep
from tests.tiny_models import tiny_random_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
DIM = 32


def _pipe(rewards: list[str] = REWARDS) -> MiroPipeline:
    return tiny_random_pipeline(rewards, "tiny-sweep", 3)


def _params(root: Path, experiment: str, **sweep: object) -> Params:
    sw: dict[str, object] = {
        "guidance_scales": [0.0, 1.0],
        "target_reward": "contrast",
        "target_values": [0.0, 1.0],
        "best_of_n": [1, 2, 4],
        "select_by": "compressibility",
    }
    sw.update(sweep)
    return Params.model_validate(
        {
            "eval": {
                "prompt_set": "shapes:1",
                "num_prompts": 6,
                "images_per_prompt": 1,
                "steps": 2,
                "batch_size": 32,
                "seed": 1,
                "rewards": ["sharpness", "contrast", "compressibility", "shapes_alignment"],
            },
            "sweep": sw,
            "storage": {"root": str(root)},
            "tracking": {"experiment": experiment},
        }
    )


def test_sweep_logs_one_child_run_per_point_and_plots_on_the_parent(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = _params(tmp_path / "store", experiment="sweep-test")
    result = stages.sweep(params, pipeline=_pipe(), manifest=tmp_path / "manifests" / "sweep-tiny.json")
    assert SweepResult.from_json((tmp_path / "manifests" / "sweep-tiny.json").read_text()) == result
    doc = result.to_dict()

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sweep-test")
    assert exp is not None
    parent_id = doc["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["miroflow.run_name"] == "sweep-tiny-sweep" and parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("sweep-tiny-sweep-")
    assert "mlflow.parentRunId" not in parent.data.tags
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    expected = [
        "guidance/omega=0",
        "guidance/omega=1",
        "target/contrast=0",
        "target/contrast=1",
        "best_of_n/n=1",
        "best_of_n/n=2",
        "best_of_n/n=4",
    ]
    assert sorted(r.info.run_name for r in children) == sorted(expected)
    assert all(r.info.status == "FINISHED" for r in children)
    by_name = {r.info.run_name: r for r in children}
    for r in children:  # every point has the same evaluation metrics
        assert {
            "eval/overall",
            "eval/reward/sharpness",
            "eval/reward/contrast",
            "eval/reward/compressibility",
            "eval/reward/shapes_alignment",
        } <= set(r.data.metrics), r.info.run_name
    assert by_name["guidance/omega=1"].data.params["guidance_scale"] == "1.0"
    assert json.loads(by_name["target/contrast=0"].data.params["reward_targets"]) == {"contrast": 0.0}
    assert by_name["best_of_n/n=4"].data.metrics["tts/denoiser_evals_per_image"] == 4 * 2
    # child metrics are the sweep.json numbers
    points = {p["name"]: p for p in doc["points"]}
    assert [p["name"] for p in doc["points"]] == expected
    for name, r in by_name.items():
        assert r.info.run_id == points[name]["run_id"]
        assert r.data.metrics["eval/reward/sharpness"] == pytest.approx(points[name]["rewards"]["sharpness"])
    # best-of-N on nested candidates: the selection reward never decreases
    bon = [points[f"best_of_n/n={n}"]["rewards"]["compressibility"] for n in (1, 2, 4)]
    assert bon == sorted(bon) and bon[-1] > bon[0]
    # the target grid did change the conditioning (every other reward at 1)
    assert points["target/contrast=0"]["reward_targets_resolved"] == {
        "sharpness": 1.0,
        "contrast": 0.0,
        "shapes_alignment": 1.0,
    }

    # plots: artifacts of the PARENT, and files in the sweep's output dir
    parent_plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    want = {
        "plots/guidance.png",
        "plots/target_contrast.png",
        "plots/tts.png",
        "plots/radar_guidance.png",
        "plots/grid_guidance.png",
        "plots/grid_target.png",
        "plots/grid_best_of_n.png",
    }
    assert want <= parent_plots
    assert "sweep.json" in {a.path for a in client.list_artifacts(parent_id)}
    for r in children:
        assert not [a for a in client.list_artifacts(r.info.run_id) if a.path.startswith("plots")]
    local = client.download_artifacts(parent_id, "plots/guidance.png", str(tmp_path / "dl"))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "store" / "sweeps" / addressed("tiny-sweep", params, "sweep")
    assert doc["output"] == str(out)
    saved = json.loads((out / "sweep.json").read_text())
    # the output dir's sweep.json is the sweep's own record; the manifest adds only where it was written
    assert doc["manifest"] == str(tmp_path / "manifests" / "sweep-tiny.json")
    assert saved == {k: v for k, v in doc.items() if k != "manifest"}
    for fname in ("guidance.png", "target_contrast.png", "tts.png", "grid_best_of_n.png"):
        assert (out / "plots" / fname).stat().st_size > 1000
    assert (out / "best_of_n" / "tts.json").is_file() and not (out / "tts").exists()
    assert (out / "points" / "guidance-omega=1" / "summary.json").is_file()
    # the same seeds at every point: ω = 0 and the default-target point with ω = 0 give identical images
    a = (out / "points" / "guidance-omega=0" / "00003" / "samples" / "0000.png").read_bytes()
    b = (out / "points" / "target-contrast=1" / "00003" / "samples" / "0000.png").read_bytes()
    assert a == b


def test_target_grid_errors_and_skips() -> None:
    p = Params.model_validate({"sweep": {"target_reward": "hpsv2"}})
    with pytest.raises(
        ValueError, match="target_reward='hpsv2' is not a reward of this model; its rewards are: sharpness, contrast"
    ):
        plan_points(p, ["sharpness", "contrast"])
    points, notes = plan_points(p, [])  # a baseline: no reward to target
    assert {pt["kind"] for pt in points} == {"guidance", "best_of_n"} and "baseline" in notes[0]
    points, _ = plan_points(
        Params.model_validate({"sweep": {"target_reward": "sharpness", "target_values": [0.5]}}), ["sharpness", "noise"]
    )
    (t,) = [pt for pt in points if pt["kind"] == "target"]
    assert t["reward_targets"] == {"sharpness": 0.5} and t["guidance_scale"] == 0.0


def test_sweep_without_tracking_still_writes_outputs(tmp_path: Path) -> None:
    params = _params(tmp_path / "store", experiment="unused", guidance_scales=[0.5], target_values=[], best_of_n=[2])
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    doc = run_sweep(params, pipeline=_pipe())
    assert doc["parent_run_id"] is None and [p["name"] for p in doc["points"]] == [
        "guidance/omega=0.5",
        "best_of_n/n=2",
    ]
    assert all(p["run_id"] is None for p in doc["points"])
    out = Path(doc["output"])
    assert (out / "plots" / "guidance.png").is_file() and (out / "sweep.json").is_file()
    assert np.isfinite(doc["points"][0]["rewards"]["sharpness"])
