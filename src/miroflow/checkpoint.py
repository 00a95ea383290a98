"""Checkpoints (docs/architecture.md, "Checkpoints") on any storage URI.

``<run>/checkpoints/step-{step:08d}/`` and ``<run>/final/`` hold::

    denoiser/           config.json + model.safetensors   (raw weights)
    ema/                config.json + model.safetensors   (EMA weights: what is evaluated)
    text_encoder/       only for the trainable 'learned' encoder (raw) ...
    ema_text_encoder/   ... and its EMA weights
    train_state.pt      optimizer, scheduler, EMA scalars, RNG states, data position
                        (plain tensors/containers; loaded with torch.load(weights_only=True))
    miro.json           written LAST; a directory without it is incomplete and ignored;
                        its "files" maps every other file to {"sha256", "size"}

Files are written into a local temp directory first and uploaded one by one through
:class:`~miroflow.storage.Storage` (each upload is atomic), ``miro.json`` last. Resume takes the
architecture from the checkpoint and refuses params that would build a different one, with an
error naming every differing key.

Integrity: every load checks the files it reads against the ``files`` record of ``miro.json``
(checkpoints written before the record existed load unverified) and turns a damaged, missing or
unparseable file, or weights that do not fit their ``config.json``, into a short
:class:`CheckpointError` naming the checkpoint and the file. :func:`resume_latest` skips (with a
warning) complete checkpoints that fail so, newest first, and resumes from the newest usable one.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from miroflow.config import Params
from miroflow.content_keys import addressed
from miroflow.errors import InputError
from miroflow.models.denoiser import CONFIG_NAME, MODEL_SIZES, WEIGHTS_NAME, DenoiserConfig, MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder
from miroflow.storage import IntegrityError, Storage, file_record, join_uri, verify_file_records

__all__ = [
    "CHECKPOINT_FORMAT",
    "MIRO_JSON",
    "ArchitectureMismatch",
    "CheckpointError",
    "FILES_KEY",
    "ResumeState",
    "run_uri",
    "checkpoint_uri",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "read_miro",
    "verify_checkpoint",
    "local_checkpoint",
    "expected_architecture",
    "checkpoint_architecture",
    "check_architecture",
    "load_for_resume",
    "resume_latest",
    "load_model",
    "load_text_encoder",
]

CHECKPOINT_FORMAT = 1
MIRO_JSON = "miro.json"
TRAIN_STATE = "train_state.pt"
#: Key of ``miro.json`` holding ``{relative path: {"sha256", "size"}}`` of every other file.
FILES_KEY = "files"
_STEP_RE = re.compile(r"step-(\d{8})$")
_T = TypeVar("_T")

log = logging.getLogger(__name__)


class ArchitectureMismatch(InputError, ValueError):
    """Params would build another model than the checkpoint holds; ``diffs`` names the keys."""

    def __init__(self, uri: str, diffs: list[str]) -> None:
        self.diffs = diffs
        super().__init__(f"architecture mismatch between checkpoint {uri} and params: " + ", ".join(diffs))


class CheckpointError(IntegrityError):
    """A checkpoint cannot be used: one of its files is missing, damaged (fails its hash record), not
    parseable, or its weights do not fit its ``config.json``. ``uri`` is the checkpoint, ``file`` the
    file relative to it (``""`` when not about one file). A ``ValueError``."""


def run_uri(params: Params) -> str:
    """``<storage.root>/runs/<train.run_name>-<hash>``: content-addressed by every param the weights
    depend on (:func:`miroflow.content_keys.stage_hash` of ``train``), so other params never
    overwrite a run an older manifest names, and the same params resume the same folder."""
    return join_uri(params.storage.root, "runs", addressed(params.train.run_name, params, "train"))


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
    never seen as complete with mixed files. ``miro.json["files"]`` records the sha256 and size of
    every uploaded file (computed from the very bytes uploaded).
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
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            rel, data = f.relative_to(d).as_posix(), f.read_bytes()
            files[rel] = file_record(data)
            storage.write_bytes(join_uri(uri, rel), data)
    doc = dict(miro, format=CHECKPOINT_FORMAT)
    doc[FILES_KEY] = files
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
    """Complete checkpoints of a run (those with a ``miro.json``) as ``(step, uri)``, oldest first.

    Complete is not verified: see :func:`verify_checkpoint` / ``latest_checkpoint(verify=True)``.
    """
    return [(s, u) for s, (u, ok) in sorted(_step_dirs(run, storage).items()) if ok]


def _newest_usable(run: str, done: list[tuple[int, str]], attempt: Callable[[str], _T]) -> _T | None:
    """``attempt(uri)`` on the complete checkpoints ``done``, newest first, until one raises no
    :class:`CheckpointError`; each failure is logged as a warning naming the skipped checkpoint.

    Returns None when ``done`` is empty. Raises CheckpointError naming ``run`` when every one fails.
    """
    if not done:
        return None
    reasons: list[str] = []
    for _, uri in reversed(done):
        try:
            return attempt(uri)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", uri, err)
            reasons.append(str(err))
    raise CheckpointError(
        f"run {run}: none of its {len(done)} complete checkpoint(s) is usable (newest: {reasons[0]}); "
        "see the warnings above",
        run,
        "",
    )


def latest_checkpoint(run: str, storage: Storage, verify: bool = False) -> str | None:
    """URI of the newest complete checkpoint under ``<run>/checkpoints`` (None if there is none).

    With ``verify``: the newest complete one whose files match its hash record
    (:func:`verify_checkpoint`); newer ones that do not are skipped with a warning naming them.

    Raises:
        CheckpointError: ``verify`` and there are complete checkpoints, none of them intact (names the run).
    """
    done = list_checkpoints(run, storage)
    if not verify:
        return done[-1][1] if done else None

    def check(uri: str) -> str:
        verify_checkpoint(uri, storage)
        return uri

    return _newest_usable(run, done, check)


def prune_checkpoints(run: str, keep: int, storage: Storage, newest: int | None = None) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints, and incomplete ones older than them.

    ``newest`` (the step of the checkpoint just written) bounds what is looked at: checkpoints of
    later steps are neither counted nor deleted. Those are left by an earlier attempt that a resume
    fell back from (they may be damaged; training rewrites them when it gets there), so a newer
    bad checkpoint never crowds out the good one just written. ``miro.json`` is deleted first, so a
    partly deleted checkpoint is already "incomplete". Returns the deleted checkpoint URIs.
    """
    dirs = {s: v for s, v in _step_dirs(run, storage).items() if newest is None or s <= newest}
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
    """The ``miro.json`` of a checkpoint.

    Raises:
        FileNotFoundError: an incomplete/missing checkpoint.
        CheckpointError: ``miro.json`` is not a JSON object.
        ValueError: an unsupported ``format``.
    """
    target = join_uri(uri, MIRO_JSON)
    if not storage.exists(target):
        raise FileNotFoundError(f"checkpoint {uri} is incomplete or missing (no {MIRO_JSON})")
    try:
        doc = json.loads(storage.read_bytes(target).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {uri}: {MIRO_JSON} is not valid JSON ({err})", uri, MIRO_JSON) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint {uri}: {MIRO_JSON} is not a JSON object", uri, MIRO_JSON)
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
    arch.update(_reward_embedding(list(reward_names), t.reward_features, params.score.num_bins - 1))
    return arch


def _reward_embedding(reward_names: list[str], features: str, grid: int | None) -> dict[str, Any]:
    """``reward_features`` / ``reward_grid`` of the architecture: both None for a baseline (no reward
    embedding), the grid None unless the mode is ``grid_interp`` (the only one that uses it)."""
    if not reward_names:
        return {"reward_features": None, "reward_grid": None}
    return {"reward_features": features, "reward_grid": grid if features == "grid_interp" else None}


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
    # A denoiser config without reward_features was written by the original Fourier embedding.
    features = den.get("reward_features") or "fourier"
    arch.update(_reward_embedding(arch["reward_names"], features, den.get("reward_grid")))
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


def _verify(uri: str, miro: dict[str, Any], d: Path, select: Callable[[str], bool] | None = None) -> bool:
    """Check the files of checkpoint ``uri`` (local copy ``d``) that ``select`` picks against the hash
    record in ``miro``; False (nothing checked) for a checkpoint written before the record existed.

    Raises:
        CheckpointError: a recorded file is missing, has another size or another sha256 (names it).
    """
    record = miro.get(FILES_KEY)
    if record is None:
        log.info("checkpoint %s has no hash record (written before checkpoints had one): loaded unverified", uri)
        return False
    try:
        verify_file_records(d, record, uri, select, kind="checkpoint")
    except IntegrityError as err:
        raise CheckpointError(str(err), uri, err.file) from None
    return True


def verify_checkpoint(uri: str, storage: Storage | None = None) -> dict[str, Any]:
    """Check every file of a complete checkpoint against its hash record; returns its ``miro.json``.

    A remote checkpoint is downloaded to a temporary directory to be hashed. A checkpoint without a
    record (older format) passes unchecked.

    Raises:
        FileNotFoundError: no ``miro.json`` (incomplete). CheckpointError: a missing or damaged file.
    """
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    with local_checkpoint(uri, storage) as d:
        _verify(uri, miro, d)
    return miro


def _few(items: list[str], n: int = 3) -> str:
    """At most ``n`` of ``items``, comma-separated, with how many more there are."""
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _state_dict_mismatch(expected: dict[str, torch.Tensor], weights: Path) -> str:
    """One line: how the tensors in the safetensors file ``weights`` differ from ``expected``
    (counts of missing / unexpected / reshaped keys, at most 3 of each named)."""
    with safe_open(str(weights), framework="pt") as f:
        found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # header only, no tensor data
    want = {k: list(v.shape) for k, v in expected.items()}
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    reshaped = sorted(k for k in set(want) & set(found) if want[k] != found[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if reshaped:
        parts.append(f"{len(reshaped)} of another shape: {_few([f'{k} {found[k]} vs {want[k]}' for k in reshaped])}")
    return "; ".join(parts) or "the tensors do not load"


def _load_part(
    uri: str,
    d: Path,
    sub: str,
    files: tuple[str, str],
    load: Callable[[Path], _T],
    build: Callable[[Path], torch.nn.Module],
) -> _T:
    """``load(d / sub)`` (a ``from_pretrained``), its failures turned into one-line CheckpointErrors.

    ``files`` = ``(config file, weights file)`` names inside ``sub``; ``build(d / sub)`` builds the
    module the config describes (only called to describe a state-dict mismatch).
    """
    config, weights = files
    folder = d / sub
    try:
        return load(folder)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {uri}: {err}", uri, sub) from None
    except SafetensorError as err:
        raise CheckpointError(
            f"checkpoint {uri}: {join_uri(uri, sub, weights)} is not a readable safetensors file ({err})",
            uri,
            f"{sub}/{weights}",
        ) from None
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        try:
            summary = _state_dict_mismatch(build(folder).state_dict(), folder / weights)
        except Exception:  # describing the mismatch must not hide it
            summary = str(err).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {uri}: the weights {sub}/{weights} do not fit {sub}/{config}: {summary}",
            uri,
            f"{sub}/{weights}",
        ) from None
    except (ValueError, TypeError) as err:  # config: bad JSON, bad or unknown fields
        first = "; ".join(str(err).splitlines()[:3])
        raise CheckpointError(
            f"checkpoint {uri}: {sub}/{config} is not a valid config: {first}", uri, f"{sub}/{config}"
        ) from None


def _load_denoiser(uri: str, d: Path, sub: str, device: str | torch.device | None = None) -> MiroDenoiser:
    return _load_part(
        uri,
        d,
        sub,
        (CONFIG_NAME, WEIGHTS_NAME),
        lambda f: MiroDenoiser.from_pretrained(f, device=device),
        lambda f: MiroDenoiser(DenoiserConfig.model_validate_json((f / CONFIG_NAME).read_text())),
    )


def _load_learned(uri: str, d: Path, sub: str) -> torch.nn.Module | None:
    if not (d / sub / "text_encoder.json").is_file():
        return None
    return _load_part(
        uri,
        d,
        sub,
        ("text_encoder.json", "text_encoder.safetensors"),
        LearnedTokenEncoder.from_pretrained,
        lambda f: LearnedTokenEncoder(**json.loads((f / "text_encoder.json").read_text())),
    )


def _load_train_state(uri: str, d: Path) -> dict[str, Any]:
    try:
        state = torch.load(d / TRAIN_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri}: {TRAIN_STATE} is missing", uri, TRAIN_STATE) from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {uri}: {join_uri(uri, TRAIN_STATE)} is not a readable train state ({first})", uri, TRAIN_STATE
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {uri}: {TRAIN_STATE} does not hold a dict", uri, TRAIN_STATE)
    return state


def load_for_resume(uri: str, params: Params, reward_names: list[str], storage: Storage | None = None) -> ResumeState:
    """Load a checkpoint to continue training with ``params`` (every file checked against the hash record).

    Raises:
        ArchitectureMismatch: the checkpoint's denoiser config / reward names / text encoder /
            latent kind differ from what ``params`` (with ``reward_names``) would build; the
            message names every differing key with both values.
        CheckpointError: a file is missing, damaged or unparseable, or weights do not fit their
            config (names the checkpoint and the file).
    """
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    check_architecture(uri, miro, params, reward_names)
    with local_checkpoint(uri, storage) as d:
        _verify(uri, miro, d)
        state = _load_train_state(uri, d)
        return ResumeState(
            uri=uri,
            step=int(miro["step"]),
            miro=miro,
            denoiser=_load_denoiser(uri, d, "denoiser"),
            ema_denoiser=_load_denoiser(uri, d, "ema"),
            train_state=state,
            text_encoder=_load_learned(uri, d, "text_encoder"),
            ema_text_encoder=_load_learned(uri, d, "ema_text_encoder"),
        )


def resume_latest(
    run: str, params: Params, reward_names: list[str], storage: Storage | None = None
) -> ResumeState | None:
    """The newest complete checkpoint of ``run`` that loads, checked, for resuming (None: there is none).

    Complete checkpoints are tried newest first with :func:`load_for_resume`; one that raises
    :class:`CheckpointError` (truncated, missing a file, failing its hash, unparseable) is skipped
    with a warning log line naming it and why.

    Raises:
        ArchitectureMismatch: not skipped (the params are wrong, not the checkpoint).
        CheckpointError: complete checkpoints exist but none is usable (names the run).
    """
    st = storage or Storage()
    return _newest_usable(run, list_checkpoints(run, st), lambda uri: load_for_resume(uri, params, reward_names, st))


def load_model(
    uri: str, storage: Storage | None = None, device: str | torch.device | None = None
) -> tuple[MiroDenoiser, dict[str, Any]]:
    """For inference: ``(MiroDenoiser with the EMA weights, in eval mode, miro.json dict)``.

    The ``ema/`` files are checked against the hash record first (CheckpointError naming the file).
    """
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    with local_checkpoint(uri, storage) as d:
        _verify(uri, miro, d, lambda rel: rel.startswith("ema/"))
        model = _load_denoiser(uri, d, "ema", device=device)
    return model.eval(), miro


def load_text_encoder(uri: str, storage: Storage | None = None) -> torch.nn.Module | None:
    """The EMA 'learned' text encoder of a checkpoint, or None for frozen encoders (rebuild from the spec)."""
    storage = storage or Storage()
    miro = read_miro(uri, storage)
    with local_checkpoint(uri, storage) as d:
        _verify(uri, miro, d, lambda rel: rel.startswith("ema_text_encoder/"))
        enc = _load_learned(uri, d, "ema_text_encoder")
    return enc.eval() if enc is not None else None
