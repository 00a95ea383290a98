"""Fixtures of the fault suite: a small scored and binned dataset, and a params file for the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from miroflow.config import Params
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score


def tiny_train_params(root: Path, run: str, steps: int = 60, **train: Any) -> dict[str, Any]:
    """A params tree: 256 scored samples under ``root`` and a tiny model trained ``steps`` steps."""
    return {
        "storage": {"root": str(root / "store")},
        "data": {
            "num_samples": 256,
            "shard_size": 128,
            "synthetic_captions": True,
            "manifest": str(root / "manifests" / "shards.json"),
        },
        "score": {
            "manifest": str(root / "manifests" / "scores.json"),
            "bins": str(root / "manifests" / "bins.json"),
            "num_bins": 16,
        },
        "train": {
            "run_name": run,
            "model": "tiny",
            "steps": steps,
            "batch_size": 16,
            "warmup_steps": 5,
            "log_every": 5,
            "eval_every": 1000,
            "sample_steps": 2,
            "checkpoint_every": 5,
            "keep_last": 3,
            "synthetic_caption_prob": 0.5,
            "text_dropout": 0.1,
            "seed": 1,
            **train,
        },
        "tracking": {"enabled": False},
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROGRESS = re.compile(r"\[\d\d:\d\d")  # tqdm's "[00:03<00:01, ...]" / "[00:00, ?img/s]"


def message_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` a user reads: progress-bar redraws and blank lines left out."""
    lines = (_ANSI.sub("", line).strip() for line in stderr.replace("\r", "\n").splitlines())
    return [line for line in lines if line and not _PROGRESS.search(line)]


def write_params(path: Path, tree: dict[str, Any]) -> Path:
    """Write ``tree`` as a params YAML file at ``path`` (returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def scored_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a prepared, scored and binned 256-sample dataset (see :func:`tiny_train_params`)."""
    root = tmp_path_factory.mktemp("faults")
    p = Params.model_validate(tiny_train_params(root, "data"))
    run_prepare(p)
    run_score(p)
    run_bin(p)
    return root
