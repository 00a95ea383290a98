"""Checkpoints: layout, completeness marker, pruning, architecture checks, S3 round trip, integrity
(hash record, damaged / unreadable / mismatched files, resume fallback)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from miroflow.checkpoint import (
    ArchitectureMismatch,
    CheckpointError,
    checkpoint_uri,
    latest_checkpoint,
    list_checkpoints,
    load_for_resume,
    load_model,
    prune_checkpoints,
    resume_latest,
    run_uri,
    save_checkpoint,
    verify_checkpoint,
)
from miroflow.config import Params, apply_overrides
from miroflow.models import MiroDenoiser, create_denoiser
from miroflow.models.text import LearnedTokenEncoder
from miroflow.pipeline_load import load_pipeline
from miroflow.storage import IntegrityError, Storage, file_record, join_uri


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


# ------------------------------------------------------------------------------------------ integrity


def _files(uri: str) -> dict[str, Path]:
    """``{relative path: path}`` of every file of a local checkpoint."""
    return {p.relative_to(uri).as_posix(): p for p in sorted(Path(uri).rglob("*")) if p.is_file()}


def _rerecord(uri: str) -> None:
    """Rewrite the hash record of a local checkpoint to match its files as they are now (as if written so)."""
    doc = json.loads((Path(uri) / "miro.json").read_text())
    doc["files"] = {rel: file_record(p.read_bytes()) for rel, p in _files(uri).items() if rel != "miro.json"}
    (Path(uri) / "miro.json").write_text(json.dumps(doc))


def _drop_record(uri: str) -> None:
    """Make a local checkpoint look like one written before checkpoints had a hash record."""
    doc = json.loads((Path(uri) / "miro.json").read_text())
    del doc["files"]
    (Path(uri) / "miro.json").write_text(json.dumps(doc))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_miro_json_records_sha256_and_size_of_every_file(tmp_path: Path) -> None:
    uri, _ = _save(str(tmp_path / "runs" / "r"), 7, Storage())
    doc = json.loads((Path(uri) / "miro.json").read_text())
    files = {rel: p for rel, p in _files(uri).items() if rel != "miro.json"}
    assert set(doc["files"]) == set(files) >= {"denoiser/model.safetensors", "ema/config.json", "train_state.pt"}
    for rel, p in files.items():
        data = p.read_bytes()
        assert doc["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel


def test_flipped_byte_in_ema_weights_is_an_error_naming_the_file(tmp_path: Path) -> None:
    storage = Storage()
    uri, _ = _save(str(tmp_path / "runs" / "r"), 5, storage)
    weights = Path(uri) / "ema" / "model.safetensors"
    _flip_byte(weights, weights.stat().st_size - 3)  # inside the tensor data: safetensors alone would not notice
    params = _params(**{"train.model": "tiny", "data.resolution": "32"})
    for load in (
        lambda: load_model(uri, storage),
        lambda: load_for_resume(uri, params, ["sharpness", "noise"], storage),
        lambda: load_pipeline(uri, storage, device="cpu"),
    ):
        with pytest.raises(IntegrityError) as err:
            load()
        msg = str(err.value)
        assert f"checkpoint {uri}" in msg and "ema/model.safetensors" in msg and "hash record" in msg, msg
        assert err.value.file == "ema/model.safetensors"
    with pytest.raises(CheckpointError, match=r"ema/model\.safetensors"):
        load_model(uri, storage)
    with pytest.raises(CheckpointError, match=r"ema/model\.safetensors"):
        verify_checkpoint(uri, storage)


def test_truncated_or_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    storage = Storage()
    run = str(tmp_path / "runs" / "r")
    params = _params(**{"train.model": "tiny", "data.resolution": "32"})
    uri, _ = _save(run, 1, storage)
    ts = Path(uri) / "train_state.pt"
    ts.write_bytes(ts.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"train_state\.pt has 100 bytes, its hash record says \d+"):
        load_for_resume(uri, params, ["sharpness", "noise"], storage)
    uri2, _ = _save(run, 2, storage)
    (Path(uri2) / "denoiser" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"denoiser/config\.json is missing"):
        load_for_resume(uri2, params, ["sharpness", "noise"], storage)
    load_model(uri2, storage)  # reads ema/ only: still fine


def test_checkpoint_without_hash_record_still_loads(tmp_path: Path) -> None:
    storage = Storage()
    uri, ema = _save(str(tmp_path / "runs" / "r"), 3, storage)
    _drop_record(uri)
    model, miro = load_model(uri, storage)
    assert "files" not in miro
    for (k, a), b in zip(model.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), k
    params = _params(**{"train.model": "tiny", "data.resolution": "32"})
    assert load_for_resume(uri, params, ["sharpness", "noise"], storage).step == 3
    assert verify_checkpoint(uri, storage)["step"] == 3


def test_load_pipeline_checks_only_what_it_reads_and_drops_the_record(tmp_path: Path) -> None:
    storage = Storage()
    raw, ema = _models(["sharpness", "noise"])
    enc = LearnedTokenEncoder.from_captions(["a red circle", "a blue square"], dim=16, num_layers=1, num_heads=2)
    miro = dict(_miro(raw, 9), text_encoder="learned", text_max_length=enc.max_length)
    uri = save_checkpoint(checkpoint_uri(str(tmp_path / "runs" / "r"), 9), storage, raw, ema, miro, _state(), enc, enc)
    _flip_byte(Path(uri) / "text_encoder" / "text_encoder.safetensors", -2)  # raw encoder: not read for EMA
    _flip_byte(Path(uri) / "denoiser" / "model.safetensors", -2)  # raw weights: not read for EMA
    pipe = load_pipeline(uri, storage, device="cpu")
    assert "files" not in pipe.spec.model_dump()  # a directory saved from this pipeline has other files
    pipe.save_pretrained(str(tmp_path / "pipe"))
    assert load_pipeline(str(tmp_path / "pipe"), device="cpu", prefer="denoiser").spec.step == 9
    _flip_byte(Path(uri) / "ema_text_encoder" / "text_encoder.safetensors", -2)
    with pytest.raises(IntegrityError, match=r"ema_text_encoder/text_encoder\.safetensors does not match"):
        load_pipeline(uri, storage, device="cpu")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_safetensors_error_names_the_path(tmp_path: Path, damage: str) -> None:
    storage = Storage()
    uri, _ = _save(str(tmp_path / "runs" / "r"), 4, storage)
    weights = Path(uri) / "ema" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file" * 3 if damage == "garbage" else weights.read_bytes()[:200])
    _rerecord(uri)  # the record matches: the file was written like this
    want = f"{uri}/ema/model.safetensors is not a readable safetensors file"
    with pytest.raises(CheckpointError) as err:
        load_model(uri, storage)
    assert want in str(err.value)
    with pytest.raises(IntegrityError) as err2:
        load_pipeline(uri, storage, device="cpu")
    assert want in str(err2.value)
    _drop_record(uri)  # the same without a record
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_model(uri, storage)


def test_weights_that_do_not_fit_the_config_give_a_short_message(tmp_path: Path) -> None:
    storage = Storage()
    uri, _ = _save(str(tmp_path / "runs" / "r"), 6, storage)
    other = create_denoiser("tiny", ["sharpness"], text_dim=16, pooled_dim=16, num_layers=1)
    (Path(uri) / "ema" / "config.json").write_text(json.dumps(other.config.model_dump(mode="json")))
    _rerecord(uri)
    for load in (lambda: load_model(uri, storage), lambda: load_pipeline(uri, storage, device="cpu")):
        with pytest.raises(IntegrityError) as err:
            load()
        msg = str(err.value)
        assert len(msg.splitlines()) <= 3 and len(msg) < 1200, msg
        assert uri in msg and "ema/model.safetensors do not fit ema/config.json" in msg, msg
        m = re.search(r"(\d+) unexpected key\(s\): ([^;]*)", msg)
        assert m is not None and int(m.group(1)) > 3, msg
        assert m.group(2).count(",") == 3 and m.group(2).endswith(f"... (+{int(m.group(1)) - 3} more)"), msg
        assert "of another shape" in msg and "[2, " in msg, msg  # 2 rewards in the file, 1 in the config


def test_resume_latest_skips_damaged_newest_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage()
    run = str(tmp_path / "runs" / "r")
    params = _params(**{"train.model": "tiny", "data.resolution": "32"})
    for step in (10, 20, 30):
        _save(run, step, storage)
    w20 = Path(checkpoint_uri(run, 20)) / "ema" / "model.safetensors"
    w20.write_bytes(w20.read_bytes()[: w20.stat().st_size // 2])  # truncated
    (Path(checkpoint_uri(run, 30)) / "train_state.pt").unlink()  # missing a file
    with caplog.at_level(logging.WARNING, logger="miroflow.checkpoint"):
        state = resume_latest(run, params, ["sharpness", "noise"], storage)
    assert state is not None and state.step == 10 and state.uri == checkpoint_uri(run, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert (
        f"skipping checkpoint {checkpoint_uri(run, 30)}" in warnings[0] and "train_state.pt is missing" in warnings[0]
    )
    assert f"skipping checkpoint {checkpoint_uri(run, 20)}" in warnings[1] and "ema/model.safetensors" in warnings[1]
    assert latest_checkpoint(run, storage) == checkpoint_uri(run, 30)  # complete, unverified
    assert latest_checkpoint(run, storage, verify=True) == checkpoint_uri(run, 10)
    # An architecture mismatch is the params' fault: never skipped.
    with pytest.raises(ArchitectureMismatch):
        resume_latest(run, params, ["sharpness"], storage)
    # Nothing usable: an error naming the run.
    _flip_byte(Path(checkpoint_uri(run, 10)) / "denoiser" / "config.json", 5)
    with pytest.raises(CheckpointError, match=rf"run {re.escape(run)}: none of its 3 complete checkpoint"):
        resume_latest(run, params, ["sharpness", "noise"], storage)
    assert resume_latest(str(tmp_path / "runs" / "fresh"), params, ["sharpness", "noise"], storage) is None


def test_prune_never_drops_the_good_checkpoint_for_a_newer_damaged_one(tmp_path: Path) -> None:
    storage = Storage()
    run = str(tmp_path / "runs" / "r")
    _save(run, 10, storage)
    _save(run, 20, storage)
    w20 = Path(checkpoint_uri(run, 20)) / "ema" / "model.safetensors"
    w20.write_bytes(w20.read_bytes()[:64])  # damaged: a resume falls back to 10 and trains on
    _save(run, 15, storage)  # the resumed run's next checkpoint
    assert prune_checkpoints(run, keep=1, storage=storage, newest=15) == [checkpoint_uri(run, 10)]
    assert [s for s, _ in list_checkpoints(run, storage)] == [15, 20]  # 20 left alone: rewritten when reached
    assert latest_checkpoint(run, storage, verify=True) == checkpoint_uri(run, 15)


def test_evaluate_resolves_past_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    from miroflow.evaluate import resolve_checkpoint

    storage = Storage()
    root = tmp_path / "store"
    params = _params(**{"storage.root": str(root), "train.run_name": "r"})
    run = run_uri(params)
    for step in (10, 20):
        _save(run, step, storage)
    _flip_byte(Path(checkpoint_uri(run, 20)) / "ema" / "model.safetensors", 100)
    assert resolve_checkpoint(params, storage) == checkpoint_uri(run, 10)
