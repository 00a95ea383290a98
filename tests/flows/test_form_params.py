"""The typed form tells the truth: a partial merged onto params_file, overrides blamed by name, every flow
argument described, list defaults in the schema, the full-size guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from miroflow.config import Params, ParamsError, form_values, resolve_params

FILE = {"data": {"num_samples": 48, "shard_size": 16}, "train": {"steps": 3, "lr": 0.002, "run_name": "fromfile"}}


@pytest.fixture
def params_file(tmp_path: Path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(FILE))
    return str(path)


def test_partial_form_merges_onto_the_params_file(params_file: str) -> None:
    form = Params.model_validate({"train": {"lr": 0.01}})  # the user set one field
    p = resolve_params(params_file, None, form)
    assert p.train.lr == 0.01  # from the form
    assert (p.train.steps, p.train.run_name, p.data.num_samples) == (3, "fromfile", 48)  # from the file


def test_prefilled_form_with_code_defaults_does_not_mask_the_file(params_file: str) -> None:
    full = Params().model_dump(mode="json")
    full["train"]["lr"] = 0.01  # a form that submits every field, one of them changed
    form = Params.model_validate(full)
    assert form_values(form) == {"train": {"lr": 0.01}}
    p = resolve_params(params_file, ["train.steps=5"], form)
    assert (p.train.lr, p.train.steps, p.data.num_samples) == (0.01, 5, 48)


def test_override_error_names_the_override(params_file: str) -> None:
    with pytest.raises(ParamsError) as err:
        resolve_params(params_file, ["train.steps=4", "train.lr=abc"])
    assert err.value.source == "overrides"
    assert "train.lr=abc" in str(err.value) and "train.steps=4" not in str(err.value)
    assert params_file not in str(err.value)


def test_file_error_still_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: -1\n")
    with pytest.raises(ParamsError, match="bad.yaml: train.steps"):
        resolve_params(str(bad), ["train.lr=0.1"])


def test_every_flow_argument_is_described_and_list_defaults_are_shown() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows._records import schema_with_code_defaults
    from flows.deploy import FLOWS

    for f in FLOWS:
        schema = parameter_schema(f.fn).model_dump()
        undescribed = [k for k, v in schema["properties"].items() if not v.get("description")]
        assert not undescribed, (f.name, undescribed)
    schema = schema_with_code_defaults(parameter_schema(FLOWS[0].fn).model_dump())
    prompts = schema["definitions"]["TrainConfig"]["properties"]["sample_prompts"]
    assert prompts["default"] == list(Params().train.sample_prompts)
    assert schema["definitions"]["SweepConfig"]["properties"]["best_of_n"]["default"] == list(Params().sweep.best_of_n)


def test_confirmation_guard_names_the_parameter() -> None:
    from flows._records import require_confirmation

    with pytest.raises(ValueError, match="confirm_full_size=true"):
        require_confirmation(Params(), confirmed=False)  # code defaults: 1500 steps, 4000 samples
    require_confirmation(Params(), confirmed=True)
    require_confirmation(Params.model_validate({"train": {"steps": 2}, "data": {"num_samples": 32}}), False)


def test_full_size_pipeline_fails_fast(prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import miro_pipeline

    monkeypatch.chdir(tmp_path)
    state = miro_pipeline(params_file=None, overrides=["train.run_name=big"], return_state=True)
    assert state.is_failed()
    assert "confirm_full_size" in (state.message or "") + str(state.result(raise_on_failure=False))
    assert not (tmp_path / "manifests").exists()  # nothing was prepared
