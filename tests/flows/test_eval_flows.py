"""The evaluate, sweep and tts Prefect flows under a real temporary Prefect server, on a saved tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import pytest

from miroflow.config import Params
from miroflow.content_keys import addressed
from miroflow.preflight import PreflightError
from tests.tiny_models import tiny_random_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
DIM = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random pipeline saved in the documented layout (miro.json + denoiser/ + text_encoder/)."""
    pipe = tiny_random_pipeline(REWARDS, "flowmodel", 11)
    out = tmp_path_factory.mktemp("ckpt") / "final"
    pipe.save_pretrained(out)
    assert (out / "miro.json").is_file()
    return str(out)


def _params(tmp: Path, checkpoint: str, tracking: bool) -> Params:
    return Params.model_validate(
        {
            "train": {"run_name": "flowmodel"},
            "eval": {
                "checkpoint": checkpoint,
                "prompt_set": "shapes:1",
                "num_prompts": 3,
                "images_per_prompt": 2,
                "steps": 2,
                "batch_size": 8,
                "rewards": ["sharpness", "compressibility", "shapes_alignment"],
            },
            "sweep": {
                "guidance_scales": [0.0],
                "target_reward": "sharpness",
                "target_values": [0.0],
                "best_of_n": [1, 2],
                "select_by": "compressibility",
            },
            "storage": {"root": str(tmp / "store")},
            "tracking": {"experiment": "flows", "enabled": tracking},
        }
    )


def _task_runs(flow_run_id: UUID) -> list[object]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))


def test_evaluate_flow_writes_outputs_and_an_mlflow_run(
    prefect_server: None, mlflow_server: str, checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from flows.evaluate import evaluate

    uri = mlflow_server  # the session's real MLflow server (tests/conftest.py)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = _params(tmp_path, checkpoint, tracking=True)
    state = evaluate(params=params, return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    out = tmp_path / "store" / "eval" / addressed("flowmodel", params, "evaluate")
    assert res["output"] == str(out) and res["checkpoint"] == checkpoint and res["n_images"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert res["overall"] == summary["overall"]
    assert res["rewards"] == {k: v["mean"] for k, v in summary["rewards"].items()}
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert json.dumps(res)  # a small JSON dict, no tensors
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.name for r in runs] == ["evaluate-flowmodel"] and runs[0].state.is_completed()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.tags["miroflow.run_name"] == "eval-flowmodel" and run.info.status == "FINISHED"
    assert run.info.run_name.startswith("eval-flowmodel-")
    assert run.data.metrics["eval/reward/sharpness"] == pytest.approx(summary["rewards"]["sharpness"]["mean"])
    assert run.data.params["eval.checkpoint"] == checkpoint


def test_evaluate_flow_fails_on_a_missing_checkpoint(prefect_server: None, tmp_path: Path) -> None:
    from flows.evaluate import evaluate

    state = evaluate(params=_params(tmp_path, str(tmp_path / "nope"), tracking=False), return_state=True)
    assert state.is_failed()
    assert "eval.checkpoint:" in (state.message or "") and "nope" in (state.message or "")  # the one line
    with pytest.raises(PreflightError, match=r"eval\.checkpoint: .*nope is not a complete checkpoint"):
        state.result()


def test_sweep_and_tts_flows(prefect_server: None, checkpoint: str, tmp_path: Path) -> None:
    from flows.sweep import sweep, tts

    p = _params(tmp_path, checkpoint, tracking=False)
    res = sweep(params=p)
    assert [pt["name"] for pt in res["points"]] == [
        "guidance/omega=0",
        "target/sharpness=0",
        "best_of_n/n=1",
        "best_of_n/n=2",
    ]
    doc = json.loads(Path(res["sweep_json"]).read_text())
    assert doc["output"] == res["output"] and Path(res["plots"]["guidance.png"]).is_file()
    t = tts(params=p, overrides=["sweep.best_of_n=[1,3]"])
    assert t["ns"] == [1, 3] and t["select_by"] == "compressibility"
    assert t["curves"]["compressibility"][1] >= t["curves"]["compressibility"][0]
    assert json.loads(Path(t["tts_json"]).read_text())["ns"] == [1, 3]


def test_flow_parameters_render_a_typed_params_form() -> None:
    from flows.evaluate import evaluate
    from flows.sweep import sweep, tts

    for f in (evaluate, sweep, tts):
        schema = f.parameters.model_dump()
        assert set(schema["properties"]) == {"params_file", "overrides", "params"}
        assert "EvalConfig" in schema["definitions"] and "SweepConfig" in schema["definitions"]
