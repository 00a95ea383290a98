"""Registered models carry their kind and an alias; ``load_pipeline("models:/<name>@<alias>")`` loads them;
an evaluation's MLflow run is nested under the run that trained its model."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from miroflow import stages
from miroflow.config import Params
from miroflow.data.hashing import data_hash
from miroflow.pipeline import load_pipeline
from miroflow.tracking import register_model


def _params(tmp: Path, name: str) -> Params:
    return Params.model_validate(
        {
            "storage": {"root": str(tmp / "store")},
            "data": {"num_samples": 32, "shard_size": 32, "manifest": str(tmp / "m" / "shards.json")},
            "train": {
                "run_name": "reg-baseline",
                "rewards": [],
                "model": "tiny",
                "steps": 3,
                "batch_size": 8,
                "warmup_steps": 1,
                "eval_every": 1000,
                "checkpoint_every": 1000,
                "text_encoder": "learned",
            },
            "eval": {"prompt_set": "shapes:1", "images_per_prompt": 1, "steps": 2},
            "tracking": {"experiment": f"reg-{uuid.uuid4().hex[:8]}", "register_model": name},
        }
    )


def test_registered_versions_have_kind_tags_and_aliases_and_load_by_alias(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"miro-reg-{uuid.uuid4().hex[:8]}"
    p = _params(tmp_path, name)
    stages.prepare(p)
    result = stages.train(p)
    client = MlflowClient(tracking_uri=mlflow_server)
    mv = client.get_model_version_by_alias(name, "baseline")
    assert mv.version == result.model_version == "1"
    assert mv.tags == {
        "kind": "baseline",
        "run_name": "reg-baseline",
        "steps": "3",
        "rewards": "none",
        "data_hash": data_hash(p.data),
    }

    # a second version takes the candidate alias; the baseline alias stays where it was
    v2 = register_model(str(result.mlflow_run_id), "final", name, alias="candidate", tags={"kind": "miro"})
    assert client.get_model_version_by_alias(name, "candidate").version == v2 == "2"
    assert client.get_model_version_by_alias(name, "baseline").version == "1"

    ev = stages.evaluate(p)
    assert ev.mlflow_run_id and ev.mlflow_run_id != result.mlflow_run_id
    eval_tags = client.get_run(ev.mlflow_run_id).data.tags
    assert eval_tags["mlflow.parentRunId"] == result.mlflow_run_id and eval_tags["stage"] == "evaluate"

    direct = load_pipeline(result.checkpoint, device="cpu")
    for uri in (f"models:/{name}@baseline", f"models:/{name}/1", f"models:/{name}@candidate"):
        pipe = load_pipeline(uri, device="cpu")
        assert pipe.denoiser.reward_names == [] and pipe.spec.step == 3 and pipe.spec.run_name == "reg-baseline"
        for (k, a), b in zip(pipe.denoiser.state_dict().items(), direct.denoiser.state_dict().values()):
            assert torch.equal(a, b), k


def test_registry_uri_errors_name_the_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with pytest.raises(FileNotFoundError, match=r"models:/no-such-model-xyz@champion: not found in the model registry"):
        load_pipeline("models:/no-such-model-xyz@champion", device="cpu")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match=r"models:/m@champion: a registry URI needs MLFLOW_TRACKING_URI"):
        load_pipeline("models:/m@champion", device="cpu")
