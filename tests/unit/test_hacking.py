"""The reward-hacking monitor on hand-built evaluation summaries (exact deltas and standard errors), its
bad-input errors, the sweep-grid walk, the plot, and the training hook on real rendered images."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miroflow import hacking, plots
from miroflow.data.shapes import render
from miroflow.hacking import JUDGE, Flag, HackingInputError, monitor_evals
from miroflow.hacking_monitor import TrainingMonitor
from miroflow.prompts import load_prompt_set
from miroflow.results import EvalSummary
from miroflow.tracking import Tracker


def _summary(where: str, sharp: float, acc: tuple[float, float], contrast: float = 0.5, **extra: Any) -> dict[str, Any]:
    """A ``summary.json``-layout point: two rewards (std 0.1 over 100 images), two categories of 50 judged images."""
    return {
        "where": where,
        "rewards": {
            "sharpness": {"mean": sharp, "std": 0.1, "n": 100},
            "contrast": {"mean": contrast, "std": 0.1, "n": 100},
        },
        "accuracy": {"single_object": acc[0], "two_object": acc[1]},
        "n_judged": {"single_object": 50, "two_object": 50},
        "overall": (acc[0] + acc[1]) / 2,
        **extra,
    }


def test_a_reward_rising_while_the_judge_falls_is_flagged_with_exact_deltas_and_ses() -> None:
    a, b = _summary("step 100", 0.40, (0.9, 0.8), x=100), _summary("step 200", 0.60, (0.6, 0.5), x=200)
    (flag,) = monitor_evals([a, b])
    assert (flag.rose, flag.fell, flag.start, flag.end, flag.x_start, flag.x_end) == (
        "sharpness",
        JUDGE,
        "step 100",
        "step 200",
        100.0,
        200.0,
    )
    assert flag.rise == pytest.approx(0.2) and flag.rise_se == pytest.approx(math.sqrt(2) * 0.01)
    # binomial per category, mean over the two: SE_A = sqrt(.9·.1/50 + .8·.2/50)/2, SE_B likewise
    se_a = math.sqrt(0.9 * 0.1 / 50 + 0.8 * 0.2 / 50) / 2
    se_b = math.sqrt(0.6 * 0.4 / 50 + 0.5 * 0.5 / 50) / 2
    assert flag.fall == pytest.approx(-0.3) and flag.fall_se == pytest.approx(math.hypot(se_a, se_b))
    assert flag.text().startswith("sharpness +0.200 ± 0.014 while judge_accuracy -0.300 ± 0.061 (step 100")
    assert Flag.from_dict(flag.to_dict()) == flag
    # by default only the judge's fall counts: rewards that oppose each other by nature move apart in
    # ordinary training; naming a reward in `against` (or None = every metric) flags reward pairs too
    b = _summary("B", 0.60, (0.6, 0.5), contrast=0.3)
    assert {(f.rose, f.fell) for f in monitor_evals([a, b])} == {("sharpness", JUDGE)}
    assert {(f.rose, f.fell) for f in monitor_evals([a, b], against=None)} == {
        ("sharpness", JUDGE),
        ("sharpness", "contrast"),
    }
    assert {(f.rose, f.fell) for f in monitor_evals([a, b], against=["contrast"])} == {("sharpness", "contrast")}


def test_opposed_rewards_alone_raise_no_flag_by_default() -> None:
    """The demo's false alarm: noise (a cleanliness reward) up, compressibility down, judge steady."""
    a = _summary("step 200", 0.5, (0.8, 0.7))
    a["rewards"]["noise"], a["rewards"]["compressibility"] = (
        {"mean": 0.70, "std": 0.05, "n": 4},
        {
            "mean": 0.30,
            "std": 0.02,
            "n": 4,
        },
    )
    b = _summary("step 400", 0.5, (0.8, 0.7))
    b["rewards"]["noise"], b["rewards"]["compressibility"] = (
        {"mean": 0.92, "std": 0.05, "n": 4},
        {
            "mean": 0.15,
            "std": 0.02,
            "n": 4,
        },
    )
    assert monitor_evals([a, b]) == []
    (flag,) = monitor_evals([a, b], against=["compressibility"])
    assert (flag.rose, flag.fell) == ("noise", "compressibility")


@pytest.mark.parametrize(
    ("against", "match"),
    [(["sharpnes"], "against names 'sharpnes', which no evaluation reports"), ("judge_accuracy", "must be a list")],
)
def test_a_bad_against_name_is_named(against: Any, match: str) -> None:
    a, b = _summary("A", 0.4, (0.9, 0.8)), _summary("B", 0.6, (0.6, 0.5))
    with pytest.raises(HackingInputError, match=match):
        monitor_evals([a, b], against=against)


def test_an_unjudged_domain_flags_nothing_by_default_and_named_rewards_when_asked() -> None:
    def pt(sharp: float, contrast: float) -> dict[str, Any]:
        return {k: v for k, v in _summary("p", sharp, (0.5, 0.5), contrast=contrast).items() if k != "accuracy"}

    assert monitor_evals([pt(0.4, 0.5), pt(0.6, 0.3)]) == []
    assert [(f.rose, f.fell) for f in monitor_evals([pt(0.4, 0.5), pt(0.6, 0.3)], against=["contrast"])] == [
        ("sharpness", "contrast")
    ]


def test_best_of_n_selection_that_trades_the_judge_is_flagged() -> None:
    """Selecting by a reward on real best-of-N statistics: the judge falls with N -> a flag at that N."""
    from miroflow.tts_stats import best_of_n

    rng = np.random.default_rng(0)
    p, n_max = 60, 8
    sharp = rng.uniform(0, 1, (p, n_max))
    # the sharper a candidate, the likelier it is wrong: selecting by sharpness hacks the judge
    correct = (rng.uniform(0, 1, (p, n_max)) > sharp).astype(float)
    tags = ["single_object" if i % 2 else "two_object" for i in range(p)]
    res = best_of_n({"sharpness": sharp}, select_by="sharpness", ns=[1, 8], judge={"correct": correct}, tags=tags)
    assert res["points"][0]["n_by_tag"] == {"two_object": 30, "single_object": 30}
    (flag,) = hacking.monitor_best_of_n(res)
    assert (flag.rose, flag.fell, flag.start, flag.end) == ("sharpness", JUDGE, "best-of-1", "best-of-8")
    # candidates whose correctness does not depend on sharpness: no flag
    fair = best_of_n(
        {"sharpness": sharp},
        select_by="sharpness",
        ns=[1, 8],
        judge={"correct": (rng.uniform(0, 1, (p, n_max)) > 0.5).astype(float)},
        tags=tags,
    )
    assert hacking.monitor_best_of_n(fair) == []
    with pytest.raises(HackingInputError, match="best-of-N result has no points"):
        hacking.monitor_best_of_n({"select_by": "sharpness"})


def test_rising_together_or_within_noise_raises_no_flag_and_k_sets_the_threshold() -> None:
    a = _summary("A", 0.40, (0.9, 0.8))
    assert monitor_evals([a, _summary("B", 0.60, (0.95, 0.85), contrast=0.55)]) == []  # everything rose
    # +0.02 (1.4 SE) on sharpness, -0.1 (1.8 SE) on the judge: noise at k = 2, a flag at k = 1
    small = _summary("B", 0.42, (0.8, 0.7))
    assert monitor_evals([a, small], k=2.0) == []
    (flag,) = monitor_evals([a, small], k=1.0)
    assert (flag.rose, flag.fell, flag.k) == ("sharpness", JUDGE, 1.0)
    assert monitor_evals([a, small], k=1.0, min_delta=0.05) == []  # sharpness moved less than min_delta
    assert monitor_evals([a]) == [] and monitor_evals([]) == []
    # the judge falling alone (no reward rose) is not hacking
    assert monitor_evals([a, _summary("B", 0.40, (0.5, 0.4))]) == []


def test_consecutive_pairs_only_and_eval_summary_objects_work() -> None:
    base = {
        "n_images": 100,
        "n_prompts": 50,
        "images_per_prompt": 2,
        "guidance_scale": 0.0,
        "reward_targets": {},
        "negative_reward_targets": {},
        "guidance_mode": None,
        "checkpoint": None,
        "prompt_set": "shapes",
        "steps": 4,
        "seed": 0,
        "output": "x",
        "model": {},
    }
    docs = [
        _summary(w, s, acc) for w, s, acc in (("A", 0.4, (0.9, 0.8)), ("B", 0.6, (0.6, 0.5)), ("C", 0.6, (0.6, 0.5)))
    ]
    summaries = [EvalSummary.from_dict({**base, **{k: v for k, v in d.items() if k != "where"}}) for d in docs]
    flags = monitor_evals(summaries)
    assert [(f.start, f.end) for f in flags] == [("point #0", "point #1")]  # B -> C moved nothing


@pytest.mark.parametrize(
    ("points", "match"),
    [
        (
            [
                _summary("A", 0.4, (0.9, 0.8)),
                {"where": "B", "rewards": {"sharpness": {"mean": None, "std": None, "n": 0}}},
            ],
            r"B: reward 'sharpness' n must be a sample count >= 1, got 0",
        ),
        (
            [
                _summary("A", 0.4, (0.9, 0.8)),
                {**_summary("B", 0.5, (0.9, 0.8)), "rewards": {"sharpness": {"mean": 0.5, "std": 0.1, "n": 9}}},
            ],
            r"B has no reward 'contrast' \(A has it\)",
        ),
        (
            [
                _summary("A", 0.4, (0.9, 0.8)),
                {k: v for k, v in _summary("B", 0.5, (0.9, 0.8)).items() if k != "accuracy"},
            ],
            r"B has no judge accuracy \(A has it\)",
        ),
        (
            [{**_summary("A", 0.4, (0.9, 0.8)), "n_judged": {"single_object": 50}}],
            r"A: accuracy of 'two_object' has no n_judged",
        ),
        (
            [{**_summary("A", 0.4, (0.9, 0.8)), "accuracy": {"single_object": 1.5, "two_object": 0.5}}],
            r"outside \[0, 1\]",
        ),
        (
            [{"where": "A", "rewards": {"sharpness": {"mean": float("nan"), "std": 0.1, "n": 3}}}],
            r"A: reward 'sharpness' mean must be a finite",
        ),
        ([{"where": "A", "rewards": {"sharpness": {"mean": 0.5, "n": 3}}}], r"A: reward 'sharpness' has no 'std'"),
        (["not a summary"], r"point #0 must be a mapping"),
    ],
)
def test_bad_points_are_named(points: list[Any], match: str) -> None:
    with pytest.raises(HackingInputError, match=match):
        monitor_evals(points)


def test_bad_k_is_an_input_error() -> None:
    with pytest.raises(HackingInputError, match="k must be a finite number > 0"):
        monitor_evals([], k=0.0)
    assert issubclass(HackingInputError, ValueError)


def test_point_from_values_uses_the_samples_own_noise() -> None:
    vals = {"sharpness": [0.2, 0.4, None, float("nan"), 0.6]}
    p = hacking.point_from_values("step 5", 5, vals, correct=[True, False, None, True, True])
    s = p.metrics["sharpness"]
    assert s.n == 3 and s.mean == pytest.approx(0.4) and s.se == pytest.approx(np.std([0.2, 0.4, 0.6]) / math.sqrt(3))
    j = p.metrics[JUDGE]  # pooled binomial over the 4 judged images
    assert j.n == 4 and j.mean == 0.75 and j.se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    cat = hacking.point_from_values("x", None, {}, [True, False, True], ["a", "a", "b"]).metrics[JUDGE]
    assert cat.mean == pytest.approx(0.75) and cat.se == pytest.approx(math.sqrt(0.25 / 2) / 2)
    with pytest.raises(HackingInputError, match="step 5: reward 'sharpness' n must be"):
        hacking.point_from_values("step 5", 5, {"sharpness": [None, float("nan")]})
    with pytest.raises(HackingInputError, match="no judged image"):
        hacking.point_from_values("step 5", 5, {}, correct=[None, None])


def _sweep_pt(kind: str, x: float, sharp: float, acc: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": f"{kind}/{x:g}",
        "x": x,
        "reward_stats": {"sharpness": {"mean": sharp, "std": 0.1, "n": 100}},
        "accuracy": {"single_object": acc},
        "n_judged": {"single_object": 100},
    }


def test_monitor_sweep_walks_each_grid_in_order_of_x() -> None:
    pts = [
        _sweep_pt("guidance", 1.0, 0.8, 0.5),  # out of order: the monitor sorts by x
        _sweep_pt("guidance", 0.0, 0.4, 0.9),
        _sweep_pt("guidance", 0.5, 0.41, 0.9),
        _sweep_pt("target", 0.0, 0.4, 0.9),
        _sweep_pt("target", 1.0, 0.6, 0.95),
        {"kind": "best_of_n", "name": "best_of_n/n=2", "x": 2.0},  # skipped: no per-category counts
    ]
    by = hacking.monitor_sweep(pts)
    assert set(by) == {"guidance", "target"} and by["target"] == []
    (f,) = by["guidance"]
    assert (f.start, f.end, f.rose, f.fell) == ("guidance/0.5", "guidance/1", "sharpness", JUDGE)
    fig = hacking.sweep_figure(pts, by, "tiny", {"guidance": "ω", "target": "target sharpness"})
    assert fig is not None and len(fig.axes) == 2 and plots.figure_png(fig)[:4] == b"\x89PNG"
    assert hacking.sweep_figure(pts[:1], {"guidance": []}, "tiny", {}) is None  # one point: nothing to draw
    with pytest.raises(HackingInputError, match="sweep point guidance/0 has no reward_stats"):
        hacking.monitor_sweep([{"kind": "guidance", "name": "guidance/0", "x": 0.0}, pts[0]])


def test_tags_and_plot_mark_the_flagged_interval() -> None:
    a, b, c = (
        _summary(w, s, acc, x=x)
        for w, s, acc, x in (("A", 0.4, (0.9, 0.8), 0), ("B", 0.6, (0.6, 0.5), 1), ("C", 0.6, (0.6, 0.5), 2))
    )
    flags = monitor_evals([a, b, c])
    assert hacking.flag_tags(flags) == {
        "hacking.flags": "1",
        "hacking.flagged": "true",
        "hacking.first": flags[0].text(),
    }
    assert hacking.flag_tags([]) == {"hacking.flags": "0", "hacking.flagged": "false"}
    fig = hacking.figure([([a, b, c], flags, "run", "step")])
    ax = fig.axes[0]
    spans = [p for p in ax.patches if p.get_facecolor()[0] > 0.8]  # the red band over [0, 1]
    assert len(spans) == 1 and "1 flagged interval" in ax.get_title()
    assert any("↑ sharpness" in t.get_text() and "judge_accuracy" in t.get_text() for t in ax.texts)
    with pytest.raises(ValueError, match="no panels"):
        plots.hacking_trajectories([])
    with pytest.raises(ValueError, match="'m' has 1 values / 2 SEs for 2 x"):
        plots.hacking_trajectories([{"x": [0, 1], "series": {"m": [0.1]}, "se": {"m": [0.1, 0.1]}}])


# --------------------------------------------------------------------------- the training hook
class RecordingTracker:
    """A real in-memory :class:`~miroflow.tracking.Tracker` (every method of the protocol)."""

    run_id: str | None = "rec"

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.figures: list[str] = []
        self.dicts: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None: ...
    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self.dicts[artifact_file] = dict(d)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        assert plots.figure_png(fig)[:4] == b"\x89PNG"
        self.figures.append(artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_checkpoint(self, uri: str, step: int) -> None: ...
    def register_model(
        self, checkpoint: str | Path, name: str, alias: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str | None:
        return None

    def child_run(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> AbstractContextManager[Tracker]:
        return nullcontext(self)


def _images(arrs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arrs.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def test_training_monitor_flags_a_grid_that_turns_to_texture_on_real_rewards_and_judge() -> None:
    items = load_prompt_set("shapes:2")  # 12 prompts with their reference scenes
    prompts = [it.prompt for it in items]
    clean = np.stack([render(it.metadata["scene"], 32) for it in items])
    stripes = np.zeros_like(clean)
    stripes[:, :, (np.arange(32) // 3) % 2 == 1] = 255  # every weight-free reward at 1, no object
    tracker = RecordingTracker()
    assert isinstance(tracker, Tracker)
    mon = TrainingMonitor(tracker, ["sharpness", "contrast", "shapes_alignment"], judged=True)
    assert mon.observe(10, _images(clean), prompts) == [] and tracker.tags == {} and tracker.metrics == []
    new = mon.observe(20, _images(stripes), prompts)
    assert {(f.rose, f.fell) for f in new} == {("sharpness", JUDGE), ("contrast", JUDGE)}  # judge-only default
    assert all((f.start, f.end) == ("step 10", "step 20") for f in new)
    # declared pairs: the alignment reward falling counts too when named
    named = TrainingMonitor(
        RecordingTracker(), ["sharpness", "shapes_alignment"], True, against=[JUDGE, "shapes_alignment"]
    )
    named.observe(10, _images(clean), prompts)
    assert ("sharpness", "shapes_alignment") in {(f.rose, f.fell) for f in named.observe(20, _images(stripes), prompts)}
    assert mon.observe(30, _images(stripes), prompts) == []  # nothing moved
    assert tracker.metrics == [(20, {"hacking/flags": float(len(new))}), (30, {"hacking/flags": 0.0})]
    assert tracker.tags["hacking.flags"] == str(len(new)) and tracker.tags["hacking.flagged"] == "true"
    assert tracker.figures == ["plots/hacking.png"]  # logged when the flag was raised
    mon.finish()
    assert tracker.figures == ["plots/hacking.png"] * 2
    assert len(tracker.dicts["hacking/flags.json"]["flags"]) == len(new)


def test_training_monitor_notes_an_unusable_point_and_carries_on() -> None:
    tracker = RecordingTracker()
    mon = TrainingMonitor(tracker, ["shapes_alignment"], judged=True)
    img = _images(np.full((2, 32, 32, 3), 128, dtype=np.uint8))
    # captions the judge cannot parse: shapes_alignment is NaN for every image -> n = 0
    assert mon.observe(5, img, ["hello world", "lorem ipsum"]) == []
    assert "step 5: reward 'shapes_alignment' n must be a sample count >= 1, got 0" in tracker.tags["hacking.error"]
    assert mon.points == [] and tracker.figures == []
