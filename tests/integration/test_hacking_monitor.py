"""The reward-hacking monitor end to end: real sweeps (real pipeline sampling, evaluation, rewards, judge,
MLflow parent run) of two models whose behaviour is known by construction, and a real training run.

The models are :class:`OracleDenoiser` s: a denoiser that knows the reference scene of every prompt of the
shapes prompt set and returns the exact rectified-flow velocity toward an image ``y(prompt, s)`` of its
sharpness target ``s`` (so one Euler step lands on ``y``, guidance on ``y⁺ + ω (y⁺ − y⁻)``):

* **hacked** — ``y = (1 − s)·render + s·stripes``: a higher sharpness target paints black/white stripes
  over the scene (every weight-free reward goes up, the objects disappear): sharpness rises, the judge's
  accuracy falls. The monitor must flag it in the target grid and in the ω grid.
* **clean** — ``y = (1 − s)·blurred render + s·render``: a higher target only sharpens the same scene;
  rewards rise, the judge holds. The monitor must raise no flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from torch import Tensor

from miroflow import stages
from miroflow.config import Params, apply_overrides
from miroflow.data.shapes import apply_degradation, render
from miroflow.hacking import JUDGE, Flag, monitor_evals, point_from_values
from miroflow.models.denoiser import MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder
from miroflow.models.vae import PixelCodec
from miroflow.pipeline import MiroPipeline
from miroflow.prepare import run_prepare
from miroflow.prompts import load_prompt_set
from miroflow.score import run_bin, run_score
from miroflow.sweep import run_sweep
from tests.tiny_models import tiny_random_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
EVAL_REWARDS = ["sharpness", "noise", "contrast", "compressibility", "shapes_alignment"]
PROMPT_SET = "shapes:2"  # 12 prompts, two per category


def _stripes(res: int) -> np.ndarray:
    """Vertical black/white stripes, 3 px wide: sharpness, contrast and compressibility at 1, no object."""
    img = np.zeros((res, res, 3), dtype=np.uint8)
    img[:, (np.arange(res) // 3) % 2 == 1] = 255
    return img


class OracleDenoiser(MiroDenoiser):
    """A :class:`MiroDenoiser` whose velocity is computed, not learned: ``v = (x_t − y) / t`` toward the
    latent ``y`` of the caption's image at the sharpness target (module docstring). The caption is
    recognised as the nearest pooled text embedding of the prompt set's captions."""

    def __init__(self, base: MiroDenoiser, pooled: Tensor, low: Tensor, high: Tensor) -> None:
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.register_buffer("bank", pooled)  # [P, Dp] pooled embedding of each caption
        self.register_buffer("low", low)  # [P, 3, H, W] latent at sharpness target 0
        self.register_buffer("high", high)  # [P, 3, H, W] latent at sharpness target 1
        self.col = base.config.reward_names.index("sharpness")

    def forward(  # type: ignore[override]
        self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor, rewards: Tensor | None = None
    ) -> Tensor:
        idx = torch.cdist(pooled.float(), self.bank).argmin(dim=1)
        s = torch.ones(x.shape[0]) if rewards is None else torch.nan_to_num(rewards[:, self.col], nan=1.0)
        s = s.clamp(0, 1).view(-1, 1, 1, 1).to(x)
        y = (1 - s) * self.low[idx] + s * self.high[idx]
        return (x - y) / t.view(-1, 1, 1, 1).clamp_min(1e-6)


def oracle_pipeline(kind: Literal["hacked", "clean"]) -> MiroPipeline:
    """The hacked or the clean model of the module docstring, as a real :class:`MiroPipeline` (32 px)."""
    base = tiny_random_pipeline(REWARDS, f"oracle-{kind}", 1000)
    items = {it.prompt: it for it in load_prompt_set(PROMPT_SET)}  # one reference scene per distinct caption
    prompts = list(items)
    clean = np.stack([render(items[p].metadata["scene"], 32) for p in prompts])
    if kind == "hacked":
        low, high = clean, np.stack([_stripes(32)] * len(prompts))
    else:
        low, high = np.stack([apply_degradation(im, "blur", 1.5) for im in clean]), clean
    enc: LearnedTokenEncoder = base.text_encoder  # type: ignore[assignment]
    codec = PixelCodec()

    def lat(a: np.ndarray) -> Tensor:
        return codec.encode(torch.from_numpy(a.astype(np.float32) / 255.0).permute(0, 3, 1, 2))

    with torch.no_grad():
        pooled = enc.encode(prompts).pooled.float()
    den = OracleDenoiser(base.denoiser, pooled, lat(low), lat(high)).eval()
    pipe = MiroPipeline(denoiser=den, text_encoder=enc, vae=codec, spec=base.spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(root: Path, experiment: str) -> Params:
    return Params.model_validate(
        {
            "eval": {
                "prompt_set": PROMPT_SET,
                "images_per_prompt": 2,
                "steps": 1,  # the oracle's field is straight: one Euler step is exact
                "batch_size": 32,
                "seed": 3,
                "rewards": EVAL_REWARDS,
                "reward_targets": {"sharpness": 0.05},  # the ω grid: y⁺ at 0.05 vs y⁻ at 0, so y at 0.05 (1 + ω)
            },
            "sweep": {
                "guidance_scales": [0.0, 4.0],
                "target_reward": "sharpness",
                "target_values": [1.0, 0.0, 0.5],  # any order: the monitor walks each grid by x
                "best_of_n": [],
            },
            "storage": {"root": str(root)},
            "tracking": {"experiment": experiment},
        }
    )


def _flags(doc: dict[str, object], kind: str) -> list[Flag]:
    """The grid's flags as sweep.json records them (on the point ending each interval), sorted."""
    flags = [Flag.from_dict(f) for p in doc["points"] if p["kind"] == kind for f in p["hacking_flags"]]  # type: ignore[index, union-attr]
    return sorted(flags, key=lambda f: (f.x_start, f.rose, f.fell))


def _recomputed(doc: dict[str, object], kind: str) -> list[Flag]:
    """The grid's flags recomputed from the per-image rows of each point's results.jsonl."""
    pts = sorted((p for p in doc["points"] if p["kind"] == kind), key=lambda p: p["x"])  # type: ignore[union-attr, index]
    evals = []
    for p in pts:
        rows = [json.loads(line) for line in Path(p["output"], "results.jsonl").read_text().splitlines()]
        vals = {r: [row[r] for row in rows] for r in EVAL_REWARDS}
        evals.append(point_from_values(p["name"], p["x"], vals, [r["correct"] for r in rows], [r["tag"] for r in rows]))
    return sorted(monitor_evals(evals), key=lambda f: (f.x_start, f.rose, f.fell))


def test_sweep_flags_the_hacked_model_and_not_the_clean_one(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server)
    docs = {}
    for kind in ("hacked", "clean"):
        res = stages.sweep(
            _params(tmp_path / kind, "hacking-test"), pipeline=oracle_pipeline(kind), manifest=tmp_path / f"{kind}.json"
        )
        docs[kind] = doc = res.to_dict()
        for grid in ("guidance", "target"):  # what sweep.json records = an independent recomputation
            got, want = _flags(doc, grid), _recomputed(doc, grid)
            assert [(f.rose, f.fell, f.start, f.end) for f in got] == [(f.rose, f.fell, f.start, f.end) for f in want]
            assert [f.rise for f in got] == pytest.approx([f.rise for f in want])
            assert [f.fall_se for f in got] == pytest.approx([f.fall_se for f in want])
        n = len(_flags(doc, "guidance")) + len(_flags(doc, "target"))
        tags = client.get_run(doc["parent_run_id"]).data.tags
        assert tags["hacking.flags"] == str(n) and tags["hacking.flagged"] == ("true" if n else "false")
        assert "plots/hacking.png" in {a.path for a in client.list_artifacts(doc["parent_run_id"], "plots")}
        assert Path(doc["plots"]["hacking.png"]).stat().st_size > 1000
        assert sum(note.startswith("hacking: ") for note in doc["notes"]) == n

    hacked = docs["hacked"]
    pts = {p["name"]: p for p in hacked["points"]}
    # what the construction promises: stripes raise sharpness, the judge loses the objects
    assert pts["target/sharpness=0"]["overall"] == 1.0 and pts["target/sharpness=1"]["overall"] == 0.0
    assert pts["target/sharpness=1"]["rewards"]["sharpness"] > pts["target/sharpness=0"]["rewards"]["sharpness"] + 0.3
    target = _flags(hacked, "target")
    assert ("sharpness", JUDGE, "target/sharpness=0", "target/sharpness=0.5") in {
        (f.rose, f.fell, f.start, f.end) for f in target
    }
    assert not pts["target/sharpness=0"]["hacking_flags"]  # the first point of a grid ends no interval
    assert any((f.rose, f.fell) == ("sharpness", JUDGE) for f in _flags(hacked, "guidance"))  # ω amplifies the hack
    assert "sharpness +" in client.get_run(hacked["parent_run_id"]).data.tags["hacking.first"]

    clean = docs["clean"]
    assert _flags(clean, "target") == [] and _flags(clean, "guidance") == []
    cpts = {p["name"]: p for p in clean["points"]}
    assert cpts["target/sharpness=1"]["rewards"]["sharpness"] > cpts["target/sharpness=0"]["rewards"]["sharpness"] + 0.1
    assert client.get_run(clean["parent_run_id"]).data.tags["hacking.flagged"] == "false"


def test_a_sweep_the_monitor_cannot_read_is_noted_not_failed(tmp_path: Path) -> None:
    """Captions the judge cannot parse: ``shapes_alignment`` is NaN on every image (n = 0), so the monitor
    refuses the points; the sweep still writes its outputs, its note and tag name the problem."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nlorem ipsum\n")
    p = _params(tmp_path / "store", "unused")
    p = p.model_copy(
        update={
            "tracking": p.tracking.model_copy(update={"enabled": False}),
            "sweep": p.sweep.model_copy(update={"target_values": []}),
            "eval": p.eval.model_copy(update={"prompt_set": f"txt:{prompts}", "rewards": ["shapes_alignment"]}),
        }
    )
    doc = run_sweep(p, pipeline=tiny_random_pipeline(REWARDS, "tiny-nan", 1))
    (note,) = [n for n in doc["notes"] if n.startswith("hacking monitor skipped")]
    assert "guidance/omega=0: reward 'shapes_alignment' n must be a sample count >= 1, got 0" in note
    assert "hacking.png" not in doc["plots"] and Path(doc["output"], "sweep.json").is_file()
    assert all("hacking_flags" not in pt for pt in doc["points"])


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a prepared, scored, binned 128-sample shapes dataset."""
    root = tmp_path_factory.mktemp("hack-train")
    ov = [
        f"storage.root={root}/store",
        "data.num_samples=128",
        "data.shard_size=128",
        f"data.manifest={root}/manifests/shards.json",
        f"score.manifest={root}/manifests/scores.json",
        f"score.bins={root}/manifests/bins.json",
        "score.num_bins=16",
    ]
    params = apply_overrides(Params(), ov)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return ov


def test_training_logs_the_monitor_at_every_eval_point(
    tiny_data: list[str], mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ov = [
        *tiny_data,
        "train.run_name=hack-train",
        "train.model=tiny",
        "train.text_encoder=learned",
        "train.steps=3",
        "train.batch_size=16",
        "train.eval_every=1",
        "train.sample_steps=2",
        "train.checkpoint_every=3",
        "tracking.experiment=hacking-train",
    ]
    res = stages.train(apply_overrides(Params(), ov), manifest=None)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(res.mlflow_run_id)
    # eval points at steps 1, 2, 3: one hacking/flags value per interval (ending at 2 and 3)
    hist = client.get_metric_history(run.info.run_id, "hacking/flags")
    assert sorted(m.step for m in hist) == [2, 3]
    flags_doc = json.loads(Path(client.download_artifacts(run.info.run_id, "hacking/flags.json")).read_text())
    assert sum(m.value for m in hist) == len(flags_doc["flags"]) and flags_doc["k"] == 2.0
    assert run.data.tags["hacking.flags"] == str(len(flags_doc["flags"]))
    assert run.data.tags["hacking.flagged"] == ("true" if flags_doc["flags"] else "false")
    assert "plots/hacking.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    for f in flags_doc["flags"]:  # every flag is one of the eval-point intervals
        assert (f["start"], f["end"]) in {("step 1", "step 2"), ("step 2", "step 3")}
