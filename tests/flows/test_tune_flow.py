"""The ``tune-targets`` Prefect flow under a real temporary Prefect server, on a saved tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow.config import Params
from miroflow.preflight import PreflightError
from tests.tiny_models import tiny_random_pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tune_flow_ckpt") / "final"
    tiny_random_pipeline(["sharpness", "contrast", "shapes_alignment"], "flowtune", 5).save_pretrained(out)
    return str(out)


def _params(tmp: Path, checkpoint: str) -> Params:
    return Params.model_validate(
        {
            "data": {"manifest": str(tmp / "manifests" / "shards.json")},
            "eval": {
                "checkpoint": checkpoint,
                "prompt_set": "shapes:1",
                "images_per_prompt": 1,
                "steps": 2,
                "batch_size": 8,
                "rewards": ["sharpness", "compressibility", "shapes_alignment"],
            },
            "tune": {
                "objective": "reward:compressibility",
                "trials": 2,
                "startup_trials": 1,
                "search_prompts": 2,
                "heldout_prompts": 2,
                "storage": f"sqlite:///{tmp / 'optuna.db'}",
            },
            "storage": {"root": str(tmp / "store")},
            "tracking": {"enabled": False},
        }
    )


def test_tune_targets_flow_runs_the_search_and_returns_uris(
    prefect_server: None, checkpoint: str, tmp_path: Path
) -> None:
    from flows.tune import tune_targets

    res = tune_targets(params=_params(tmp_path, checkpoint), trials=3)
    assert (res["n_trials"], res["new_trials"]) == (3, 3) and res["parent_run_id"] is None
    doc = json.loads(Path(res["tune_json"]).read_text())
    assert doc["study_name"] == res["study_name"] and doc["heldout"]["best"]["n"] == 2
    assert Path(res["plots"]["objective.png"]).is_file() and Path(res["summary"]).is_file()
    assert json.dumps(res)  # a small JSON dict, no tensors
    schema = tune_targets.parameters.model_dump()
    assert {"params_file", "overrides", "params", "trials"} == set(schema["properties"])
    assert "TuneConfig" in schema["definitions"]


def test_tune_targets_flow_fails_with_the_one_line_error(prefect_server: None, checkpoint: str, tmp_path: Path) -> None:
    from flows.tune import tune_targets

    state = tune_targets(params=_params(tmp_path, checkpoint), overrides=["tune.rewards=[nope]"], return_state=True)
    assert state.is_failed() and "tune.rewards: unknown reward 'nope'" in (state.message or "")
    with pytest.raises(PreflightError, match="tune.rewards: unknown reward 'nope'"):
        state.result()
