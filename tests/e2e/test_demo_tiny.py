"""`miroflow demo` end to end at a tiny size: every stage runs, the sweep finds the MIRO checkpoint
(the demo's runs are content-addressed by their own params), and the demo's manifests stay out of
DVC's `manifests/`."""

from __future__ import annotations

from pathlib import Path

from miroflow import stages
from miroflow.config import Params


def test_tiny_demo_runs_every_stage_into_its_own_manifests(tmp_path: Path) -> None:
    params = Params.model_validate(
        {
            "data": {"num_samples": 64, "shard_size": 32},
            "score": {"num_bins": 8, "rewards": ["sharpness", "noise", "shapes_alignment"]},
            "train": {"batch_size": 16, "warmup_steps": 1, "sample_steps": 2},
            "eval": {"prompt_set": "shapes:1", "images_per_prompt": 1, "steps": 2},
            "storage": {"root": str(tmp_path / "store")},
            "tracking": {"enabled": False},
        }
    )
    lines: list[str] = []
    out = stages.demo(params, steps=3, echo=lines.append, manifests=str(tmp_path / "demo-manifests"))
    assert [r.steps for r in out.runs] == [3, 3]
    assert out.sweep.points and Path(out.sweep.output).is_dir()
    assert "/runs/demo-miro-" in out.runs[1].checkpoint
    written = {p.name for p in (tmp_path / "demo-manifests").glob("*.json")}
    assert {"shards.json", "scores.json", "bins.json", "train-demo-miro.json", "sweep-demo-miro.json"} <= written
    assert any(line.startswith("[sweep] demo-miro") for line in lines)
