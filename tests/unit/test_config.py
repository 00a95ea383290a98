"""Typed params: loading, overrides, validation errors naming dotted keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from miroflow.cli import app
from miroflow.config import Params, ParamsError, load_params, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_is_valid_and_complete() -> None:
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == {"data", "score", "train", "eval", "sweep", "storage", "tracking", "tune"}
    assert params.data.resolution == raw["data"]["resolution"]


def test_every_field_has_a_description() -> None:
    def walk(model: type, prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Params.__mro__[1]):
                missing += walk(ann, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)
        return missing

    assert walk(Params, "") == []


def test_overrides_parse_yaml_values() -> None:
    tree = parse_overrides(["train.lr=3e-4", "score.rewards=[sharpness, noise]", "data.synthetic_captions=true"])
    assert tree == {
        "train": {"lr": 3e-4},
        "score": {"rewards": ["sharpness", "noise"]},
        "data": {"synthetic_captions": True},
    }
    params = load_params(None, ["train.lr=3e-4", "data.num_samples=10"])
    assert params.train.lr == pytest.approx(3e-4)
    assert params.data.num_samples == 10


def test_bad_override_names_key() -> None:
    with pytest.raises(ParamsError) as err:
        load_params(None, ["train.lr=fast"])
    assert any(p.startswith("train.lr:") for p in err.value.problems)
    with pytest.raises(ParamsError):
        parse_overrides(["train.lr"])


def test_wrong_type_and_unknown_key_both_reported(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: fast\ndata:\n  colour_count: 7\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    text = "\n".join(err.value.problems)
    assert "train.lr: Input should be a valid number" in text
    assert "data.colour_count: unknown key" in text


def test_cli_validate_exits_nonzero_and_names_keys(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  lr: fast\nsweep:\n  bogus: 1\n")
    result = CliRunner().invoke(app, ["params", "validate", "--file", str(bad)])
    assert result.exit_code == 1
    assert "train.lr: Input should be a valid number" in result.output
    assert "sweep.bogus: unknown key" in result.output
    ok = CliRunner().invoke(app, ["params", "validate", "--file", str(REPO / "params.yaml")])
    assert ok.exit_code == 0, ok.output


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ParamsError):
        load_params(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- domain-dependent defaults
IMPORT = ["data.domain=import", "data.import_uri=/in"]


def test_import_domain_fills_the_defaults_only_where_not_given() -> None:
    from miroflow.config import IMPORT_DEFAULT_REWARDS, SHAPES_DEFAULT_REWARDS, DataConfig, apply_overrides

    imp = list(IMPORT_DEFAULT_REWARDS)
    assert Params().score.rewards == list(SHAPES_DEFAULT_REWARDS) and Params().sweep.select_by == "shapes_alignment"
    assert load_params(None, IMPORT).score.rewards == imp
    assert apply_overrides(Params(), IMPORT).score.rewards == imp  # Params() gave nothing: defaults resolved again
    assert Params(data=DataConfig(domain="import")).score.rewards == imp
    assert load_params(None, [*IMPORT, "score.rewards=null", "sweep.select_by=null"]).sweep.select_by == "sharpness"
    assert load_params(None, ["score.rewards=null"]).score.rewards == list(SHAPES_DEFAULT_REWARDS)
    # given values are kept (preflight judges them)
    p = load_params(None, [*IMPORT, "score.rewards=[noise,shapes_alignment]"])
    assert p.score.rewards == ["noise", "shapes_alignment"] and p.sweep.select_by == "noise"
    assert load_params(None, [*IMPORT, "sweep.select_by=contrast"]).sweep.select_by == "contrast"
    # rewards with configured weights join the import defaults
    w = load_params(None, [*IMPORT, "score.reward_weights.laion_aesthetic=/w/aesthetic"])
    assert w.score.rewards == [*imp, "laion_aesthetic"]


def test_repo_params_yaml_resolves_per_domain() -> None:
    from miroflow.config import IMPORT_DEFAULT_REWARDS, SHAPES_DEFAULT_REWARDS

    assert load_params(REPO / "params.yaml").score.rewards == list(SHAPES_DEFAULT_REWARDS)
    assert load_params(REPO / "params.yaml", IMPORT).score.rewards == list(IMPORT_DEFAULT_REWARDS)
