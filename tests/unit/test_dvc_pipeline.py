"""The generated DVC pipelines and the content keys they share with the object store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from miroflow.checkpoint import run_uri
from miroflow.config import Params, apply_overrides, load_params
from miroflow.content_keys import STAGE_PARAMS, TRAIN_EXECUTION_ONLY, param_value, stage_hash
from miroflow.dvc_pipeline import PROFILES, module_closure, render_pipeline, rendered_files
from miroflow.score import score_table_uri

REPO = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "score", "bin", "embed", "train", "evaluate", "sweep"]


def test_committed_pipelines_are_what_the_module_renders() -> None:
    for rel, text in rendered_files().items():
        path = REPO / rel
        assert path.is_file(), f"{rel} is missing: run `python -m miroflow.dvc_pipeline`"
        assert path.read_text() == text, f"{rel} is stale: run `python -m miroflow.dvc_pipeline`"


def test_bare_repro_pipeline_has_no_study_and_the_study_has_its_own() -> None:
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(root["stages"]) == STAGES  # `dvc repro` (no target) reads the root dvc.yaml only
    study = yaml.safe_load((REPO / "study" / "dvc.yaml").read_text())
    assert list(study["stages"]) == ["study"] and study["stages"]["study"]["wdir"] == ".."
    assert {"docs/results.md": {"cache": False}} in study["stages"]["study"]["outs"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_listed_param_key_is_in_the_profile_file(profile: str) -> None:
    """DVC fails on a listed key missing from the params file: every file spells every key."""
    _, params_file = PROFILES[profile]
    doc = yaml.safe_load((REPO / params_file).read_text())
    for stage, keys in STAGE_PARAMS.items():
        for key in keys:
            section, _, name = key.partition(".")
            assert name in doc[section], f"{params_file}: {key} (a param of {stage}) is missing"
    p = load_params(REPO / params_file, [])  # and the file validates
    assert param_value(p, "train.steps") == doc["train"]["steps"]
    with pytest.raises(KeyError, match="no param 'train.nope'"):
        param_value(p, "train.nope")


def test_small_profile_writes_its_own_manifests_and_store() -> None:
    small = load_params(REPO / "profiles/small/params.yaml", [])
    default = load_params(REPO / "params.yaml", [])
    assert Path(small.data.manifest).parent != Path(default.data.manifest).parent
    assert small.storage.root != default.storage.root
    assert small.train.steps < default.train.steps and small.data.num_samples < default.data.num_samples
    doc = render_pipeline("small")
    assert doc["stages"]["train"]["cmd"] == "python -m miroflow train --params profiles/small/params.yaml"
    assert doc["stages"]["train"]["wdir"] == "../.."


def test_execution_only_keys_are_not_params_and_change_no_key() -> None:
    listed = set(STAGE_PARAMS["train"])
    assert not {f"train.{k}" for k in TRAIN_EXECUTION_ONLY} & listed
    base = Params()
    for key, value in [("train.log_every", 7), ("train.device", "cpu"), ("train.keep_last", 9), ("eval.batch_size", 3)]:
        other = apply_overrides(base, [f"{key}={value}"])
        assert run_uri(other) == run_uri(base), key
        assert stage_hash(other, "sweep") == stage_hash(base, "sweep"), key


def test_result_keys_move_with_their_inputs_and_only_downstream() -> None:
    base = Params()
    lr = apply_overrides(base, ["train.lr=0.0005"])
    assert run_uri(lr) != run_uri(base) and run_uri(lr).startswith(f"{base.storage.root}/runs/miro-")
    assert stage_hash(lr, "evaluate") != stage_hash(base, "evaluate")
    assert stage_hash(lr, "score") == stage_hash(base, "score")  # train keys are downstream of score
    rewards = apply_overrides(base, ["score.rewards=[sharpness,noise]"])
    assert stage_hash(rewards, "train") != stage_hash(base, "train")  # upstream change propagates
    shard = f"{base.storage.root}/shards/abc/train-000000.tar"
    assert score_table_uri(rewards, shard) != score_table_uri(base, shard)
    assert score_table_uri(lr, shard) == score_table_uri(base, shard)


def test_stage_closure_follows_imports_and_rejects_unknown_modules() -> None:
    train = module_closure(("miroflow.train",))
    assert "src/miroflow/train_step.py" in train and "src/miroflow/models/denoiser.py" in train
    assert "src/miroflow/evaluate.py" not in module_closure(("miroflow.prepare",))
    with pytest.raises(ModuleNotFoundError, match="miroflow.nope"):
        module_closure(("miroflow.nope",))
    with pytest.raises(KeyError, match="unknown DVC profile 'huge'"):
        render_pipeline("huge")
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        stage_hash(Params(), "nope")
