"""Checkpoints: layout, completeness marker, pruning, architecture checks, S3 round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from miroflow.checkpoint import (
    ArchitectureMismatch,
    checkpoint_uri,
    latest_checkpoint,
    list_checkpoints,
    load_for_resume,
    load_model,
    prune_checkpoints,
    save_checkpoint,
)
from miroflow.config import Params, apply_overrides
from miroflow.models import MiroDenoiser, create_denoiser
from miroflow.storage import Storage, join_uri


def _models(rewards: list[str]) -> tuple[MiroDenoiser, MiroDenoiser]:
    torch.manual_seed(0)
    raw = create_denoiser("tiny", rewards, text_dim=16, pooled_dim=16)
    ema = create_denoiser("tiny", rewards, text_dim=16, pooled_dim=16)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    return raw, ema


def _miro(model: MiroDenoiser, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "run_name": "r",
        "text_encoder": "minilm",
        "text_max_length": 32,
        "latent": "pixel",
        "vae": None,
        "latent_stats": None,
        "resolution": 32,
        "reward_names": model.reward_names,
        "bins": None,
        "text_dropout": 0.0,
        "denoiser": model.config.model_dump(mode="json"),
    }


def _state() -> dict[str, Any]:
    return {
        "step": 3,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "rng": {"torch": torch.get_rng_state()},
        "data": {"step": 3},
    }


def _save(run: str, step: int, storage: Storage, rewards: list[str] | None = None) -> tuple[str, MiroDenoiser]:
    raw, ema = _models(rewards if rewards is not None else ["sharpness", "noise"])
    uri = save_checkpoint(checkpoint_uri(run, step), storage, raw, ema, _miro(raw, step), _state())
    return uri, ema


def _params(**kw: str) -> Params:
    return apply_overrides(Params(), [f"{k}={v}" for k, v in kw.items()])


def test_layout_latest_and_prune(tmp_path: Path) -> None:
    storage = Storage()
    run = str(tmp_path / "runs" / "r")
    assert latest_checkpoint(run, storage) is None
    for step in (10, 20, 30):
        _save(run, step, storage)
    ck = Path(checkpoint_uri(run, 30))
    for rel in (
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "ema/model.safetensors",
        "train_state.pt",
        "miro.json",
    ):
        assert (ck / rel).is_file(), rel
    assert json.loads((ck / "miro.json").read_text())["format"] == 1
    # A checkpoint without miro.json (killed mid-write) is ignored.
    (Path(checkpoint_uri(run, 30)) / "miro.json").unlink()
    assert latest_checkpoint(run, storage) == checkpoint_uri(run, 20)
    deleted = prune_checkpoints(run, keep=1, storage=storage)
    assert deleted == [checkpoint_uri(run, 10)]
    assert [s for s, _ in list_checkpoints(run, storage)] == [20]
    assert not Path(checkpoint_uri(run, 10)).exists()
    assert (
        Path(checkpoint_uri(run, 30)) / "ema" / "model.safetensors"
    ).is_file()  # newer incomplete one kept (may be in progress)


def test_load_model_and_resume_state(tmp_path: Path) -> None:
    storage = Storage()
    run = str(tmp_path / "runs" / "r")
    uri, ema = _save(run, 5, storage)
    model, miro = load_model(uri, storage)
    assert miro["step"] == 5 and not model.training
    for (k, a), b in zip(model.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), k
    params = _params(**{"train.model": "tiny", "data.resolution": "32"})
    state = load_for_resume(uri, params, ["sharpness", "noise"], storage)
    assert state.step == 5 and torch.equal(state.train_state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert state.train_state["rng"]["torch"].dtype == torch.uint8


def test_resume_with_other_architecture_names_keys(tmp_path: Path) -> None:
    storage = Storage()
    uri, _ = _save(str(tmp_path / "runs" / "r"), 1, storage)
    params = _params(**{"train.model": "small", "train.text_encoder": "learned"})
    with pytest.raises(ArchitectureMismatch) as err:
        load_for_resume(uri, params, ["sharpness"], storage)
    msg = str(err.value)
    assert msg.startswith(f"architecture mismatch between checkpoint {uri} and params:")
    assert "num_layers (checkpoint 3, params 4)" in msg
    assert "num_attention_heads (checkpoint 2, params 4)" in msg
    assert "reward_names (checkpoint ['sharpness', 'noise'], params ['sharpness'])" in msg
    assert "text_encoder (checkpoint 'minilm', params 'learned')" in msg
    assert "patch_size" not in msg


def test_s3_round_trip(s3_bucket: str) -> None:
    storage = Storage(retries=1)
    run = join_uri(f"s3://{s3_bucket}", "store", "runs", "r")
    for step in (1, 2, 3):
        uri, ema = _save(run, step, storage)
    storage.delete(join_uri(checkpoint_uri(run, 3), "miro.json"))
    assert latest_checkpoint(run, storage) == checkpoint_uri(run, 2)
    model, miro = load_model(checkpoint_uri(run, 2), storage)
    assert miro["step"] == 2
    assert prune_checkpoints(run, keep=1, storage=storage) == [checkpoint_uri(run, 1)]
    assert not storage.list(checkpoint_uri(run, 1) + "/")
    assert [s for s, _ in list_checkpoints(run, storage)] == [2]
