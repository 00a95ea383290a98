"""The MLflow layout (miroflow.tracking.layout, pipeline_run, images, eval_report) against a real SQLite store."""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from miroflow import tracking as T
from miroflow.checkpoint import run_uri
from miroflow.compare import resolve_run
from miroflow.config import Params, ParamsError, apply_overrides
from miroflow.content_keys import STAGE_PARAMS, stage_hash
from miroflow.eval_report import eval_figure, eval_tables
from miroflow.tracking.images import captioned_grid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('layout')}/mlflow.db"


@pytest.fixture
def client(store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    yield MlflowClient(tracking_uri=store)


def _params(**tracking: object) -> Params:
    return Params.model_validate({"tracking": {"experiment": f"layout-{uuid.uuid4().hex[:8]}", **tracking}})


def test_experiments_are_model_training_experiments(client: MlflowClient) -> None:
    p = _params()
    with T.start_run(p, run_name="first"):
        pass
    exp = client.get_experiment_by_name(p.tracking.experiment)
    assert exp is not None and exp.tags[T.EXPERIMENT_KIND_TAG] == T.EXPERIMENT_KIND == "custom_model_development"
    # an experiment made elsewhere without the tag gets it once; a kind chosen in the UI is kept
    old, genai = _params(), _params()
    old_id = client.create_experiment(old.tracking.experiment)
    genai_id = client.create_experiment(genai.tracking.experiment, tags={T.EXPERIMENT_KIND_TAG: "genai_development"})
    for q in (old, genai):
        with T.start_run(q, run_name="x"):
            pass
    assert client.get_experiment(old_id).tags[T.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai_id).tags[T.EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_run_logs_its_stage_sections_and_the_whole_config(client: MlflowClient) -> None:
    p = apply_overrides(_params(), ["eval.steps=7", "train.run_name=m1"])
    with T.start_run(p, run_name="eval-m1", tags={"stage": "evaluate"}) as t:
        run_id = t.run_id
    params = client.get_run(run_id).data.params
    assert {k for k in params if not k.startswith("eval.")} == {"train.run_name", "git_commit"}
    assert params["eval.steps"] == "7" and params["train.run_name"] == "m1"
    assert T.stage_params(p, "train").keys() == {"data", "score", "train", "storage"}
    assert T.stage_params(p, "no-such-stage") == p.model_dump(mode="json")  # unknown stage: everything
    with tempfile.TemporaryDirectory() as tmp:
        doc = yaml.safe_load(Path(client.download_artifacts(run_id, T.PARAMS_ARTIFACT, tmp)).read_text())
    assert Params.model_validate(doc) == p  # the whole resolved config, round-trips


def test_run_names_are_unique_and_names_still_resolve(client: MlflowClient) -> None:
    p = _params()
    ids = []
    for _ in range(2):
        with T.start_run(p, run_name="twin") as t:
            ids.append(t.run_id)
    runs = [client.get_run(i) for i in ids]
    assert all(re.fullmatch(r"twin-[0-9a-f]{6}", r.info.run_name) for r in runs)
    assert runs[0].info.run_name != runs[1].info.run_name
    assert [T.run_label(r) for r in runs] == ["twin", "twin"]
    assert resolve_run(client, "twin", p.tracking.experiment).info.run_id == ids[1]  # the newest of that name
    assert resolve_run(client, runs[0].info.run_name, p.tracking.experiment).info.run_id == ids[0]  # MLflow name
    assert re.fullmatch(r"train-m-600steps-[0-9a-f]{6}", T.unique_run_name("train-m", "600steps"))
    with pytest.raises(ValueError, match="must not be empty"):
        T.unique_run_name("  ")


def test_pipeline_run_is_the_parent_of_every_top_level_run(client: MlflowClient) -> None:
    p = _params()
    with T.pipeline_run(p, "flow", tags={"team": "vision"}) as pid:
        assert pid is not None
        child_params = p.model_copy(update={"tracking": p.tracking.model_copy(update={"parent_run_id": pid})})
        with T.tracked_run(child_params, "m", {"stage": "train"}) as train:
            with T.tracked_run(child_params, "eval-m", {"stage": "evaluate"}, parent_run_id=train.run_id) as ev:
                pass
    parent = client.get_run(pid)
    assert parent.data.tags["stage"] == "pipeline" and parent.data.tags["team"] == "vision"
    assert re.fullmatch(r"flow-1500steps-[0-9a-f]{6}", parent.info.run_name) and parent.info.status == "FINISHED"
    assert client.get_run(str(train.run_id)).data.tags["mlflow.parentRunId"] == pid
    assert client.get_run(str(ev.run_id)).data.tags["mlflow.parentRunId"] == train.run_id  # explicit parent wins
    with pytest.raises(RuntimeError, match="boom"), T.pipeline_run(p, "fails") as failed_id:
        raise RuntimeError("boom")
    assert client.get_run(str(failed_id)).info.status == "FAILED"
    with T.pipeline_run(_params(enabled=False), "off") as none:
        assert none is None


def test_a_bad_parent_run_id_is_one_error_naming_the_field_before_a_run_opens(client: MlflowClient) -> None:
    missing = _params(parent_run_id="f" * 32)
    with pytest.raises(T.TrackingError, match=r"^tracking\.parent_run_id: no MLflow run 'f{32}'"):
        with T.tracked_run(missing, "m", {"stage": "train"}):
            pytest.fail("the run must not open")
    exp = client.get_experiment_by_name(missing.tracking.experiment)
    assert exp is not None and client.search_runs([exp.experiment_id]) == []  # nothing was created
    other = _params()
    with T.start_run(other, run_name="elsewhere") as t:
        foreign = t.run_id
    with pytest.raises(T.TrackingError, match=r"tracking\.parent_run_id: .* is in experiment .*not in tracking"):
        with T.pipeline_run(_params(parent_run_id=foreign), "demo"):
            pass
    with pytest.raises(ParamsError, match=r"tracking\.parent_run_id"):
        apply_overrides(Params(), ["tracking.parent_run_id=not a run id"])


def test_parent_run_id_is_execution_only() -> None:
    base = Params()
    other = apply_overrides(base, ["tracking.parent_run_id=0123abcd"])
    assert not any(k.startswith("tracking.") for keys in STAGE_PARAMS.values() for k in keys)
    assert run_uri(other) == run_uri(base)
    assert all(stage_hash(other, s) == stage_hash(base, s) for s in STAGE_PARAMS)


def test_captioned_grid_upscales_and_captions(client: MlflowClient) -> None:
    images = np.random.default_rng(0).random((3, 3, 32, 32))
    grid = captioned_grid(images, ["a red circle", "a very long prompt " * 8, "x"])
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * (128 + 4) + 4 and grid.shape[0] > 128 + 8
    assert (grid[4:132, 4:132] == np.kron(np.round(images[0].transpose(1, 2, 0) * 255), np.ones((4, 4, 1)))).all()
    assert captioned_grid(np.zeros((1, 100, 100, 3), np.uint8), ["x"]).shape[1] == 200 + 8  # k = ceil(128/100)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        captioned_grid(images, ["a", "b"])
    with pytest.raises(ValueError, match=r"shape \[N, 3, H, W\]"):
        captioned_grid(np.zeros((32, 32)), [])
    with T.start_run(_params(), run_name="tables") as t:
        with pytest.raises(ValueError, match="columns of one length"):
            t.log_table({"a": [1, 2], "b": [1]}, "t.json")
        with pytest.raises(ValueError, match=r"must end in \.json"):
            t.log_table({"a": [1]}, "t.csv")


def test_eval_tables_and_figure() -> None:
    summary = {
        "accuracy": {"counting": 0.5, "colors": 1.0},
        "n_judged": {"counting": 4, "colors": 2},
        "overall": 0.75,
        "rewards": {"sharpness": {"mean": 0.4, "std": 0.2, "n": 4}, "noise": {"mean": None, "std": None, "n": 0}},
    }
    acc, rew = eval_tables(summary)
    assert acc["category"] == ["colors", "counting", "overall"] and acc["n_judged"] == [2, 4, 6]
    assert acc["se"][1] == pytest.approx(0.25) and acc["accuracy"][2] == 0.75
    assert rew["reward"] == ["noise", "sharpness"] and rew["se"] == [0.0, pytest.approx(0.1)]
    assert json.dumps(rew, allow_nan=True)
    assert len(eval_figure(summary).axes) == 2
    assert len(eval_figure({**summary, "accuracy": {}, "n_judged": {}}).axes) == 1  # import domain: rewards only
    with pytest.raises(ValueError, match="no 'rewards' mapping"):
        eval_tables({"accuracy": {}})
