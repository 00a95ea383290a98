"""Best-of-N test-time scaling: nested selection, cross-metric reporting, compute accounting, errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from miroflow.config import Params
from miroflow.content_keys import addressed
from miroflow.evaluate import generate, sample_seed
from miroflow.pipeline import MiroPipeline
from miroflow.prompts import load_prompt_set
from miroflow.rewards.base import RewardNotFound
from miroflow.tts import best_of_n, compute_cost, generate_candidates, judge_arrays, run_tts
from tests.tiny_models import tiny_random_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
DIM = 32
STEPS = 3


@pytest.fixture(scope="module")
def pipe() -> MiroPipeline:
    """A tiny random MIRO pipeline whose samples vary in compressibility and judge score."""
    return tiny_random_pipeline(REWARDS, "tiny-tts", 7)


def _params(root: Path, **sweep: object) -> Params:
    sw = {"best_of_n": [1, 2, 4, 8], "select_by": "compressibility"}
    sw.update(sweep)
    return Params.model_validate(
        {
            "eval": {
                "prompt_set": "shapes:1",
                "steps": STEPS,
                "batch_size": 16,
                "seed": 5,
                "rewards": ["compressibility", "sharpness", "contrast", "shapes_alignment"],
            },
            "sweep": sw,
            "storage": {"root": str(root)},
            "tracking": {"enabled": False},
        }
    )


# --------------------------------------------------------------------------- pure selection
def test_cross_metric_reporting_matches_a_hand_selection() -> None:
    a = np.array([[0.1, 0.9, 0.5, 0.2], [0.7, 0.3, np.nan, 0.8]])
    b = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    correct = np.array([[1.0, 0.0, 1.0, 1.0], [np.nan, np.nan, np.nan, np.nan]])
    res = best_of_n({"a": a, "b": b}, select_by="a", ns=[4, 1, 2], judge={"correct": correct}, tags=["x", "y"])
    assert res["ns"] == [1, 2, 4]  # sorted
    assert res["selected"] == [[0, 0], [1, 0], [1, 3]]
    # select by a, report b for the selected images
    assert res["curves"]["a"] == pytest.approx([0.4, 0.8, 0.85])
    assert res["curves"]["b"] == pytest.approx([3.0, 3.5, 5.0])
    # prompt 1 is never judged: accuracy is over prompt 0 only; overall over its category only
    assert res["curves"]["accuracy"] == pytest.approx([1.0, 0.0, 0.0])
    assert res["points"][0]["accuracy_by_tag"] == {"x": 1.0} and res["curves"]["overall"] == pytest.approx(
        [1.0, 0.0, 0.0]
    )
    assert res["points"][2]["rewards"]["b"] == {"mean": 5.0, "std": 3.0, "n": 2}
    assert "images" not in res
    json.dumps(res)  # JSON-safe


def test_nan_candidates_are_never_selected_over_finite_ones() -> None:
    s = np.array([[np.nan, 0.2, np.nan], [np.nan, np.nan, np.nan]])
    res = best_of_n({"r": s}, select_by="r", ns=[1, 3])
    assert res["selected"] == [[0, 0], [1, 0]]  # an all-NaN prompt keeps its first candidate
    assert res["curves"]["r"] == [None, 0.2]  # means over finite values only; none at N=1


def test_images_of_the_selected_candidates_are_returned() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 5, 4, 4, 3), dtype=np.uint8)
    scores = {"r": rng.random((3, 5))}
    res = best_of_n(imgs, scores, "r", [1, 5])
    assert res["images"].shape == (2, 3, 4, 4, 3) and res["images"].dtype == np.uint8
    for k, n in enumerate(res["ns"]):
        for i in range(3):
            j = int(np.argmax(scores["r"][i, :n]))
            np.testing.assert_array_equal(res["images"][k, i], imgs[i, j])


def test_compute_accounting() -> None:
    assert compute_cost(4, 50, 0.0, 5) == {
        "denoiser_evals_per_image": 200,
        "selection_reward_calls_per_image": 4,
        "reward_calls_per_image": 20,
    }
    assert compute_cost(4, 50, 1.5, 5)["denoiser_evals_per_image"] == 400  # guidance: two branches per step
    res = best_of_n(
        {"a": np.zeros((2, 8)), "b": np.ones((2, 8))}, select_by="a", ns=[1, 2, 8], steps=10, guidance_scale=0.5
    )
    assert res["compute"]["denoiser_evals_per_image"] == [20, 40, 160]
    assert res["compute"]["selection_reward_calls_per_image"] == [1, 2, 8]
    assert res["compute"]["reward_calls_per_image"] == [2, 4, 16]
    assert res["compute"]["branches"] == 2
    assert res["points"][2]["denoiser_evals_per_image"] == 160


def test_bad_select_by_lists_the_rewards() -> None:
    with pytest.raises(ValueError, match=r"select_by='hpsv2'.*sharpness, contrast"):
        best_of_n({"sharpness": np.zeros((1, 2)), "contrast": np.zeros((1, 2))}, select_by="hpsv2", ns=[1])


def test_n_larger_than_the_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"N=5 is outside \[1, Nmax=4\]"):
        best_of_n({"r": np.zeros((2, 4))}, select_by="r", ns=[1, 5])
    with pytest.raises(ValueError, match="N=0"):
        best_of_n({"r": np.zeros((2, 4))}, select_by="r", ns=[0])
    with pytest.raises(ValueError, match="empty N grid"):
        best_of_n({"r": np.zeros((2, 4))}, select_by="r", ns=[])


def test_inconsistent_shapes_are_errors() -> None:
    with pytest.raises(ValueError, match=r"has shape \(2, 3\), expected \(2, 4\)"):
        best_of_n({"a": np.zeros((2, 4)), "b": np.zeros((2, 3))}, select_by="a", ns=[1])
    with pytest.raises(ValueError, match="images must have shape"):
        best_of_n(np.zeros((2, 3, 4, 4, 3), np.uint8), {"a": np.zeros((2, 4))}, "a", [1])
    with pytest.raises(ValueError, match="1 tags for 2 prompts"):
        best_of_n({"a": np.zeros((2, 4))}, select_by="a", ns=[1], judge={"correct": np.zeros((2, 4))}, tags=["x"])


def test_judge_arrays() -> None:
    v = [{"correct": True, "judge_score": 1.0}, None, {"correct": False, "judge_score": 0.5}, None]
    j = judge_arrays(v, 2, 2)
    np.testing.assert_array_equal(j["correct"], [[1.0, np.nan], [0.0, np.nan]])
    np.testing.assert_array_equal(j["judge_score"], [[1.0, np.nan], [0.5, np.nan]])


# --------------------------------------------------------------------------- with a tiny random pipeline
def test_selected_reward_never_decreases_with_n_on_fixed_seeds(pipe: MiroPipeline) -> None:
    items = load_prompt_set("shapes:1")
    cands = generate_candidates(
        pipe,
        items,
        8,
        ["compressibility", "sharpness", "shapes_alignment"],
        seed=5,
        steps=STEPS,
        guidance_scale=0.0,
        batch_size=16,
    )
    assert cands.images.shape == (6, 8, 32, 32, 3) and cands.seeds[2, 3] == sample_seed(5, 2, 3)
    # candidate j of prompt i is the image generate() makes for its seed alone (up to float rounding)
    again = generate(pipe, [items[2].prompt], [sample_seed(5, 2, 3)], num_inference_steps=STEPS)
    assert np.abs(again[0].astype(int) - cands.images[2, 3].astype(int)).max() <= 1  # batched float rounding
    ns = [1, 2, 3, 4, 6, 8]
    # (not shapes_alignment: this random pipeline draws noise, which the judge scores 0 on every candidate)
    for select_by in ("compressibility", "sharpness"):
        res = best_of_n(
            cands.images, cands.scores, select_by, ns, judge=cands.judge, tags=[it.tag for it in items], steps=STEPS
        )
        curve = np.array(res["curves"][select_by], dtype=float)
        assert np.all(np.diff(curve) >= -1e-12), (select_by, curve)
        assert curve[-1] > curve[0], (select_by, curve)  # the candidates differ, so selection must help
        # per prompt too: the selected value is the running max over the first N candidates
        key = np.where(np.isfinite(cands.scores[select_by]), cands.scores[select_by], -np.inf)
        for k, n in enumerate(res["ns"]):
            sel = np.array(res["selected"][k])
            np.testing.assert_array_equal(key[np.arange(6), sel], key[:, :n].max(axis=1))
        # every reward is reported for the selected images
        assert set(res["curves"]) >= {"compressibility", "sharpness", "shapes_alignment", "accuracy", "overall"}


def test_run_tts_writes_json_and_csv(pipe: MiroPipeline, tmp_path: Path) -> None:
    params = _params(tmp_path / "store")
    res = run_tts(params, pipeline=pipe)
    out = tmp_path / "store" / "sweeps" / addressed("tiny-tts", params, "sweep") / "tts"
    saved = json.loads((out / "tts.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["ns"] == [1, 2, 4, 8] and saved["n_max"] == 8 and saved["n_prompts"] == 6
    assert saved["select_by"] == "compressibility" and saved["output"] == str(out)
    assert saved["compute"]["denoiser_evals_per_image"] == [STEPS, 2 * STEPS, 4 * STEPS, 8 * STEPS]
    rows = list(csv.DictReader(io.StringIO((out / "tts.csv").read_text())))
    assert [int(r["n"]) for r in rows] == [1, 2, 4, 8]
    assert [float(r["compressibility"]) for r in rows] == pytest.approx(saved["curves"]["compressibility"], rel=1e-5)
    assert {"sharpness", "contrast", "shapes_alignment", "accuracy", "overall", "denoiser_evals_per_image"} <= set(
        rows[0]
    )
    cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 6 * 8 and cands[9]["seed"] == sample_seed(5, 1, 1)
    # N=1 picks candidate 0 of each prompt: its mean equals the mean of those candidates
    first = [c["compressibility"] for c in cands if c["sample_index"] == 0]
    assert saved["curves"]["compressibility"][0] == pytest.approx(float(np.mean(first)))
    for name in ("selected.png", "tts.png"):
        assert (out / name).stat().st_size > 1000


def test_run_tts_rejects_unknown_select_by_before_generating(pipe: MiroPipeline, tmp_path: Path) -> None:
    with pytest.raises(RewardNotFound, match="valid rewards: .*sharpness"):
        run_tts(_params(tmp_path / "store", select_by="no_such_reward"), pipeline=pipe)
    assert not (tmp_path / "store").exists()
