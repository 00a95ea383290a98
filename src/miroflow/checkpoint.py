"""Checkpoints (docs/architecture.md, "Checkpoints") on any storage URI.

``<run>/checkpoints/step-{step:08d}/`` and ``<run>/final/`` hold::

    denoiser/           config.json + model.safetensors   (raw weights)
    ema/                config.json + model.safetensors   (EMA weights: what is evaluated)
    text_encoder/       only for the trainable 'learned' encoder (raw) ...
    ema_text_encoder/   ... and its EMA weights
    train_state.pt      optimizer, scheduler, EMA scalars, RNG states, data position
                        (plain tensors/containers; loaded with torch.load(weights_only=True))
    miro.json           written LAST; a directory without it is incomplete and ignored

Files are written into a local temp directory first and uploaded one by one through
:class:`~miroflow.storage.Storage` (each upload is atomic), ``miro.json`` last. Resume takes the
architecture from the checkpoint and refuses params that would build a different one, with an
error naming every differing key.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from miroflow.config import Params
from miroflow.models.denoiser import MODEL_SIZES, MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder
from miroflow.storage import Storage, join_uri

__all__ = [
    "CHECKPOINT_FORMAT",
    "MIRO_JSON",
    "ArchitectureMismatch",
    "ResumeState",
    "run_uri",
    "checkpoint_uri",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "read_miro",
    "local_checkpoint",
    "expected_architecture",
    "checkpoint_architecture",
    "check_architecture",
    "load_for_resume",
    "load_model",
    "load_text_encoder",
]

CHECKPOINT_FORMAT = 1
MIRO_JSON = "miro.json"
TRAIN_STATE = "train_state.pt"
_STEP_RE = re.compile(r"step-(\d{8})$")


class ArchitectureMismatch(ValueError):
    """Params would build another model than the checkpoint holds; ``diffs`` names the keys."""

    def __init__(self, uri: str, diffs: list[str]) -> None:
        self.diffs = diffs
        super().__init__(f"architecture mismatch between checkpoint {uri} and params: " + ", ".join(diffs))


def run_uri(params: Params) -> str:
    """``<storage.root>/runs/<train.run_name>``."""
    return join_uri(params.storage.root, "runs", params.train.run_name)


def checkpoint_uri(run: str, step: int) -> str:
    """``<run>/checkpoints/step-{step:08d}``."""
    return join_uri(run, "checkpoints", f"step-{int(step):08d}")


def save_checkpoint(
    uri: str,
    storage: Storage,
    denoiser: MiroDenoiser,
    ema_denoiser: MiroDenoiser,
    miro: dict[str, Any],
    train_state: dict[str, Any],
    text_encoder: torch.nn.Module | None = None,
    ema_text_encoder: torch.nn.Module | None = None,
) -> str:
    """Write one checkpoint to ``uri`` (any storage URI); ``miro.json`` is uploaded last.

    An existing ``miro.json`` at ``uri`` is deleted first, so a checkpoint being rewritten is
    never seen as complete with mixed files.
    """
    storage.delete(join_uri(uri, MIRO_JSON))
    with tempfile.TemporaryDirectory(prefix="miroflow-ckpt-") as tmp:
        d = Path(tmp)
        denoiser.save_pretrained(d / "denoiser")
        ema_denoiser.save_pretrained(d / "ema")
        if text_encoder is not None:
            text_encoder.save_pretrained(d / "text_encoder")  # type: ignore[operator]
        if ema_text_encoder is not None:
            ema_text_encoder.save_pretrained(d / "ema_text_encoder")  # type: ignore[operator]
        torch.save(train_state, d / TRAIN_STATE)
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            storage.write_bytes(join_uri(uri, f.relative_to(d).as_posix()), f.read_bytes())
    doc = dict(miro, format=CHECKPOINT_FORMAT)
    storage.write_bytes(join_uri(uri, MIRO_JSON), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return uri


def _step_dirs(run: str, storage: Storage) -> dict[int, tuple[str, bool]]:
    """``step -> (checkpoint uri, complete)`` for every ``step-*`` directory under ``<run>/checkpoints``."""
    base = join_uri(run, "checkpoints")
    out: dict[int, tuple[str, bool]] = {}
    for f in storage.list(base.rstrip("/") + "/"):
        rel = f[len(base.rstrip("/")) + 1 :] if f.startswith(base.rstrip("/")) else f.split("/checkpoints/", 1)[-1]
        head, _, rest = rel.partition("/")
        m = _STEP_RE.match(head)
        if not m:
            continue
        step = int(m.group(1))
        uri, done = out.get(step, (checkpoint_uri(run, step), False))
        out[step] = (uri, done or rest == MIRO_JSON)
    return out


def list_checkpoints(run: str, storage: Storage) -> list[tuple[int, str]]:
    """Complete checkpoints of a run as ``(step, uri)``, oldest first."""
    return [(s, u) for s, (u, ok) in sorted(_step_dirs(run, storage).items()) if ok]


def latest_checkpoint(run: str, storage: Storage) -> str | None:
    """URI of the newest complete checkpoint under ``<run>/checkpoints`` (None if there is none)."""
    done = list_checkpoints(run, storage)
    return done[-1][1] if done else None


def prune_checkpoints(run: str, keep: int, storage: Storage) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints, and incomplete ones older than them.

    ``miro.json`` is deleted first, so a partly deleted checkpoint is already "incomplete".
    Returns the deleted checkpoint URIs.
    """
    dirs = _step_dirs(run, storage)
    complete = sorted(s for s, (_, ok) in dirs.items() if ok)
    keep_steps = set(complete[-keep:]) if keep > 0 else set()
    newest = complete[-1] if complete else None
    deleted = []
    for step, (uri, ok) in sorted(dirs.items()):
        if step in keep_steps or (not ok and (newest is None or step > newest)):
            continue
        storage.delete(join_uri(uri, MIRO_JSON))
        for f in storage.list(uri.rstrip("/") + "/"):
            storage.delete(f)
        local = storage.local_path(uri)
        if local is not None and local.is_dir():  # drop the now-empty local directories
            for sub in sorted((p for p in local.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [local]:
                with suppress(OSError):  # not empty (e.g. a foreign file): leave it
                    sub.rmdir()
        deleted.append(uri)
    return deleted


def read_miro(uri: str, storage: Storage) -> dict[str, Any]:
    """The ``miro.json`` of a checkpoint. Raises FileNotFoundError for an incomplete/missing one."""
    target = join_uri(uri, MIRO_JSON)
    if not storage.exists(target):
        raise FileNotFoundError(f"checkpoint {uri} is incomplete or missing (no {MIRO_JSON})")
    doc = json.loads(storage.read_bytes(target).decode("utf-8"))
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {uri}: unsupported format {doc.get('format')!r} (expected {CHECKPOINT_FORMAT})")
    return doc


@contextmanager
def local_checkpoint(uri: str, storage: Storage) -> Iterator[Path]:
    """A local directory with the checkpoint's files (the directory itself for local URIs)."""
    local = storage.local_path(uri)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="miroflow-ckpt-") as tmp:
        storage.download_tree(uri, Path(tmp))
        yield Path(tmp)


_ARCH_FIELDS = ("patch_size", "num_layers", "attention_head_dim", "num_attention_heads", "reward_hidden_dim")


def expected_architecture(params: Params, reward_names: list[str]) -> dict[str, Any]:
    """The architecture keys ``params`` determines (denoiser preset fields + conditioning)."""
    t = params.train
    if t.model not in MODEL_SIZES:
        raise ValueError(f"train.model: unknown size {t.model!r}; valid: {', '.join(MODEL_SIZES)}")
    preset = MODEL_SIZES[t.model]
    arch: dict[str, Any] = {k: preset.get(k) for k in _ARCH_FIELDS}
    if t.latent == "pixel":
        arch.update(in_channels=3, sample_size=params.data.resolution)
    arch.update(
        reward_names=list(reward_names),
        text_encoder=t.text_encoder,
        latent=t.latent,
        vae=t.vae if t.latent == "vae" else None,
    )
    return arch


def checkpoint_architecture(miro: dict[str, Any]) -> dict[str, Any]:
    """The same keys as :func:`expected_architecture`, read from a ``miro.json``."""
    den = miro.get("denoiser") or {}
    arch: dict[str, Any] = {k: den.get(k) for k in _ARCH_FIELDS}
    arch.update(in_channels=den.get("in_channels"), sample_size=den.get("sample_size"))
    arch.update(
        reward_names=list(miro.get("reward_names") or []),
        text_encoder=miro.get("text_encoder"),
        latent=miro.get("latent"),
        vae=miro.get("vae"),
    )
    return arch


def check_architecture(uri: str, miro: dict[str, Any], params: Params, reward_names: list[str]) -> None:
    """Raise :class:`ArchitectureMismatch` naming each key where checkpoint and params differ."""
    want = expected_architecture(params, reward_names)
    have = checkpoint_architecture(miro)
    diffs = [f"{k} (checkpoint {have.get(k)!r}, params {v!r})" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ArchitectureMismatch(uri, diffs)


@dataclass
class ResumeState:
    """Everything a resumed run restores (modules on CPU)."""

    uri: str
    step: int
    miro: dict[str, Any]
    denoiser: MiroDenoiser
    ema_denoiser: MiroDenoiser
    train_state: dict[str, Any]
    text_encoder: torch.nn.Module | None
    ema_text_encoder: torch.nn.Module | None


def _load_learned(d: Path) -> torch.nn.Module | None:
    if not (d / "text_encoder.json").is_file():
        return None
    return LearnedTokenEncoder.from_pretrained(d)


def load_for_resume(uri: str, params: Params, reward_names: list[str], storage: Storage | None = None) -> ResumeState:
    """Load a checkpoint to continue training with ``params``.

    Raises:
        ArchitectureMismatch: the checkpoint's denoiser config / reward names / text encoder /
            latent kind differ from what ``params`` (with ``reward_names``) would build; the
            message names every differing key with both values.
    """
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    check_architecture(uri, miro, params, reward_names)
    with local_checkpoint(uri, storage) as d:
        state = torch.load(d / TRAIN_STATE, map_location="cpu", weights_only=True)
        return ResumeState(
            uri=uri,
            step=int(miro["step"]),
            miro=miro,
            denoiser=MiroDenoiser.from_pretrained(d / "denoiser"),
            ema_denoiser=MiroDenoiser.from_pretrained(d / "ema"),
            train_state=state,
            text_encoder=_load_learned(d / "text_encoder"),
            ema_text_encoder=_load_learned(d / "ema_text_encoder"),
        )


def load_model(
    uri: str, storage: Storage | None = None, device: str | torch.device | None = None
) -> tuple[MiroDenoiser, dict[str, Any]]:
    """For inference: ``(MiroDenoiser with the EMA weights, in eval mode, miro.json dict)``."""
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    with local_checkpoint(uri, storage) as d:
        model = MiroDenoiser.from_pretrained(d / "ema", device=device)
    return model.eval(), miro


def load_text_encoder(uri: str, storage: Storage | None = None) -> torch.nn.Module | None:
    """The EMA 'learned' text encoder of a checkpoint, or None for frozen encoders (rebuild from the spec)."""
    storage = storage or Storage()
    read_miro(uri, storage)
    with local_checkpoint(uri, storage) as d:
        enc = _load_learned(d / "ema_text_encoder")
    return enc.eval() if enc is not None else None
