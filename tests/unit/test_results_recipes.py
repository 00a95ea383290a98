"""Typed stage results (JSON round trip, strict fields) and the validated run-set recipes."""

from __future__ import annotations

import json
import math

import pytest

from miroflow.config import Params, ParamsError, apply_overrides
from miroflow.recipes import baseline_of, derive, miro_of, pipeline_runs, sized, specialist_of, synthetic_of
from miroflow.results import EvalSummary, PrepareResult, RewardStat, ShardRef, TrainResult, eval_metrics
from miroflow.util import json_safe


def _summary() -> EvalSummary:
    return EvalSummary(
        accuracy={"counting": 0.5, "colors": 1.0},
        overall=0.75,
        n_judged={"counting": 2, "colors": 2},
        rewards={"sharpness": RewardStat(mean=0.25, std=0.1, n=4), "noise": RewardStat(mean=None, std=None, n=0)},
        n_images=4,
        n_prompts=2,
        images_per_prompt=2,
        guidance_scale=0.0,
        reward_targets={"sharpness": 1.0},
        negative_reward_targets={"sharpness": 0.0},
        guidance_mode="batched",
        checkpoint="ck/final",
        prompt_set="shapes:1",
        steps=2,
        seed=0,
        output="out",
        model={"run_name": "m", "step": 6},
    )


def test_results_round_trip_through_json() -> None:
    s = _summary()
    assert EvalSummary.from_json(s.to_json()) == s
    t = TrainResult(
        run_name="m",
        kind="miro",
        checkpoint="c",
        loss=0.1,
        steps=3,
        wall_time_s=1.5,
        mlflow_run_id=None,
        model_version=None,
        manifest="manifests/train-m.json",
    )
    assert TrainResult.from_json(t.to_json()) == t
    p = PrepareResult(
        manifest="m.json",
        root="r",
        data_hash="abc",
        domain="shapes",
        num_samples=3,
        shards=(ShardRef(uri="a.tar", sha256="00", n=3),),
    )
    back = PrepareResult.from_json(p.to_json())
    assert back == p and isinstance(back.shards[0], ShardRef)
    with pytest.raises(AttributeError):
        t.steps = 4  # type: ignore[misc]  # frozen


def test_from_dict_names_unknown_and_missing_fields() -> None:
    d = TrainResult(
        run_name="m",
        kind="miro",
        checkpoint="c",
        loss=None,
        steps=3,
        wall_time_s=1.5,
        mlflow_run_id=None,
        model_version=None,
        manifest=None,
    ).to_dict()
    with pytest.raises(ValueError, match=r"TrainResult: unknown field\(s\) \['stepz'\]"):
        TrainResult.from_dict({**d, "stepz": 1})
    d.pop("checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        TrainResult.from_dict(d)


def test_eval_metrics_is_the_one_conversion() -> None:
    m = _summary().metrics()
    assert m == {"eval/counting": 0.5, "eval/colors": 1.0, "eval/overall": 0.75, "eval/reward/sharpness": 0.25}
    assert eval_metrics({}, None, {"a": None}) == {}
    assert _summary().metrics(prefix="")["overall"] == 0.75


def test_json_safe() -> None:
    import numpy as np

    doc = json_safe({"a": np.float32(0.5), "b": float("nan"), "c": (np.int64(3), math.inf), 1: np.arange(2)})
    assert doc == {"a": 0.5, "b": None, "c": [3, None], "1": [0, 1]}
    json.dumps(doc, allow_nan=False)


def test_recipes_match_the_override_strings_they_replace() -> None:
    p = Params()
    assert baseline_of(p) == apply_overrides(p, [f"train.run_name={p.train.run_name}-baseline", "train.rewards=[]"])
    assert miro_of(baseline_of(p), "m").train.rewards is None
    assert specialist_of(p, "sharpness").train.rewards == ["sharpness"]
    assert synthetic_of(p, 0.5).train.synthetic_caption_prob == 0.5
    s = sized(p, 600)
    assert (s.train.steps, s.train.eval_every, s.train.checkpoint_every) == (600, 200, 200)
    runs = pipeline_runs(p)
    assert [r.train.run_name for r in runs] == [p.train.run_name, f"{p.train.run_name}-baseline"]
    assert runs[1].train.rewards == [] and runs[0] == p


def test_recipes_validate_everything() -> None:
    p = Params()
    with pytest.raises(ParamsError) as err:
        derive(p, train={"steps": -1})
    assert any(line.startswith("train.steps") for line in err.value.problems)
    with pytest.raises(ParamsError, match="trainz: unknown params section"):
        derive(p, trainz={"steps": 1})
    with pytest.raises(ParamsError) as err2:
        derive(p, train={"stepz": 1})
    assert any("train.stepz" in line for line in err2.value.problems)
    with pytest.raises(ValueError, match="'nope' is not in score.rewards"):
        specialist_of(p, "nope")
    with pytest.raises(ParamsError):
        synthetic_of(p, 1.5)
