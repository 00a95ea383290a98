"""The whole-pipeline Prefect flow on a tiny shapes dataset under a temporary Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow.config import load_params


def test_pipeline_flow_runs_every_stage_and_resumes(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import miro_pipeline

    monkeypatch.chdir(tmp_path)
    p = load_params(
        None,
        [
            "data.num_samples=32",
            "data.shard_size=16",
            "score.rewards=[sharpness, contrast, shapes_alignment]",
            "score.num_bins=8",
            "train.steps=2",
            "train.batch_size=8",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.sample_steps=1",
            "train.warmup_steps=1",
            "train.run_name=flowtest",
            "eval.prompt_set=shapes:1",
            "eval.images_per_prompt=1",
            "eval.steps=1",
            "tracking.enabled=false",
        ],
    )
    out = miro_pipeline(params=p)
    assert out["data"]["shards"] == 2 and out["scores"]["scored"] == 2
    assert set(out["runs"]) == {"flowtest", "flowtest-baseline"}
    for name, r in out["runs"].items():
        assert r["train"]["steps"] == 2
        summary = json.loads(Path(r["evaluate"]["summary_uri"]).read_text())
        assert summary["n_images"] == 6, name
    again = miro_pipeline(params=p)
    assert again["scores"]["skipped"] == 2 and again["scores"]["scored"] == 0


def test_pipeline_flow_rejects_bad_override(prefect_server: None) -> None:
    from flows.pipeline import miro_pipeline

    with pytest.raises(Exception, match="train.steps"):
        miro_pipeline(params_file="params.yaml", overrides=["train.steps=-1"])
