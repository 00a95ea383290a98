"""Checks that run before any work: every entry point calls :func:`preflight` first (docs/architecture.md, "Errors").

Two parts:

- :func:`check_params` — semantic checks of a :class:`~miroflow.config.Params` that need no I/O:
  reward names (``score.rewards``, ``train.rewards``, ``eval.rewards``, ``sweep.select_by``,
  ``sweep.target_reward``, target keys), target ranges ([0, 1]), the model and text-encoder
  names, the prompt-set name, data domain / ``data.import_uri`` consistency, rewards valid for the
  data domain (a shapes-only reward such as ``shapes_alignment`` is refused for ``data.domain=import``,
  docs/architecture.md, "Imported data"), the torchrun fields (``train.rdzv_endpoint`` when
  ``train.nnodes > 1``, a batch divisible by the world size). ``miroflow params validate`` runs these.
- :func:`preflight` — those plus the I/O checks of one stage: its inputs exist (manifests, bins,
  a complete checkpoint, a prompt set that parses and, for ``data.domain=import``, is not the
  synthetic ``shapes`` set) and its outputs are writable (``storage.root`` and the manifest folder by
  a real write-and-delete probe; a local MLflow database folder).

Every problem is one line that names the dotted params key (and the file or URI); all of a
stage's problems are reported together as one :class:`PreflightError`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from miroflow.checkpoint import latest_checkpoint, run_uri
from miroflow.config import IMPORT_DEFAULT_REWARDS, Params, ParamsError, TrainConfig
from miroflow.data.sidecars import vae_embed_problem
from miroflow.models.denoiser import MODEL_SIZES
from miroflow.prompts import PROMPT_SETS, PromptSetError, load_prompt_set
from miroflow.rewards.registry import available_rewards, reward_domain_problem
from miroflow.storage import Storage, StorageError, from_config, join_uri
from miroflow.tracking.uris import resolve_tracking_uri

__all__ = ["STAGES", "PreflightError", "Stage", "check_params", "preflight"]

Stage = Literal["prepare", "score", "bin", "embed", "train", "evaluate", "sweep", "tts"]
STAGES: tuple[str, ...] = ("prepare", "score", "bin", "embed", "train", "evaluate", "sweep", "tts")
_WRITES_STORAGE = {"prepare", "score", "bin", "embed", "train", "evaluate", "sweep", "tts"}
_NEEDS_MODEL = {"evaluate", "sweep", "tts"}
_TRACKED = {"train", "evaluate", "sweep", "tts"}


class PreflightError(ParamsError):
    """A stage cannot start; ``problems`` holds one ``dotted.key: message`` line per problem."""

    def __init__(self, stage: str, problems: list[str]) -> None:
        super().__init__(f"{stage} preflight", problems)


# --------------------------------------------------------------------------- no I/O
def _reward_problems(field: str, names: Iterable[str], known: set[str]) -> list[str]:
    return [
        f"{field}: unknown reward {name!r} (known: {', '.join(sorted(known))})" for name in names if name not in known
    ]


def _target_problems(field: str, targets: dict[str, float], known: set[str]) -> list[str]:
    out = _reward_problems(field, targets, known)
    for name, value in targets.items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            out.append(f"{field}.{name}: {value} is outside [0, 1] (targets are normalised reward levels)")
    return out


def _domain_problems(params: Params) -> list[str]:
    """One line per reward named anywhere in ``params`` that cannot score ``data.domain`` (e.g.
    ``shapes_alignment`` under ``import``); the ``score.rewards`` line says what the default would be."""
    domain = params.data.domain
    sc, tr, ev, sw = params.score, params.train, params.eval, params.sweep
    named: list[tuple[str, list[str]]] = [
        ("score.rewards", list(sc.rewards)),
        ("score.reward_weights", list(sc.reward_weights)),
        ("train.rewards", list(tr.rewards or [])),
        ("eval.rewards", list(ev.rewards or [])),
        ("eval.reward_targets", list(ev.reward_targets)),
        ("eval.negative_reward_targets", list(ev.negative_reward_targets)),
        ("sweep.select_by", [sw.select_by]),
        ("sweep.target_reward", [sw.target_reward] if sw.target_reward is not None else []),
    ]
    out: list[str] = []
    for field, names in named:
        for name in names:
            line = reward_domain_problem(field, name, domain)
            if line is not None:
                if field == "score.rewards" and domain == "import":
                    line += f" (unset or null = the import defaults: {', '.join(IMPORT_DEFAULT_REWARDS)})"
                out.append(line)
    return out


def _launch_problems(tr: TrainConfig) -> list[str]:
    """The torchrun fields: a rendezvous endpoint for several machines, a batch every rank can share."""
    out = []
    if tr.nnodes > 1 and not tr.rdzv_endpoint:
        out.append(
            f"train.rdzv_endpoint: required when train.nnodes > 1 (got nnodes={tr.nnodes}): host:port of the "
            "c10d rendezvous on one of the machines"
        )
    world = tr.nproc_per_node * tr.nnodes
    if world > 1 and tr.batch_size % (world * tr.grad_accum):
        out.append(
            f"train.batch_size: {tr.batch_size} is not divisible by the world size {world} (train.nproc_per_node "
            f"{tr.nproc_per_node} × train.nnodes {tr.nnodes}) × train.grad_accum {tr.grad_accum}"
        )
    return out


def check_params(params: Params) -> list[str]:
    """Semantic problems of ``params`` that need no I/O, one ``dotted.key: message`` line each."""
    known = set(available_rewards())
    sc, tr, ev, sw = params.score, params.train, params.eval, params.sweep
    problems = _reward_problems("score.rewards", sc.rewards, known)
    problems += _reward_problems("score.reward_weights", sc.reward_weights, known)
    if tr.rewards is not None:
        problems += _reward_problems("train.rewards", tr.rewards, known)
        problems += [
            f"train.rewards: {name!r} is not scored (add it to score.rewards)"
            for name in tr.rewards
            if name in known and name not in sc.rewards
        ]
    if ev.rewards is not None:
        problems += _reward_problems("eval.rewards", ev.rewards, known)
    problems += _target_problems("eval.reward_targets", ev.reward_targets, known)
    problems += _target_problems("eval.negative_reward_targets", ev.negative_reward_targets, known)
    problems += _reward_problems("sweep.select_by", [sw.select_by], known)
    if sw.target_reward is not None:
        problems += _reward_problems("sweep.target_reward", [sw.target_reward], known)
    problems += [
        f"sweep.target_values[{i}]: {v} is outside [0, 1]"
        for i, v in enumerate(sw.target_values)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0)
    ]
    if tr.model not in MODEL_SIZES:
        problems.append(f"train.model: unknown model size {tr.model!r} (known: {', '.join(MODEL_SIZES)})")
    kind, sep, arg = tr.text_encoder.partition(":")
    if not ((not sep and kind in ("minilm", "learned")) or (sep and kind in ("t5", "clip") and arg.strip())):
        problems.append(
            f"train.text_encoder: {tr.text_encoder!r} is not 'minilm', 'learned', 't5:<path-or-id>' or 'clip:<path-or-id>'"
        )
    problems += _launch_problems(tr)
    if tr.latent == "vae" and not tr.vae:
        problems.append("train.vae: required when train.latent is 'vae' (a local AutoencoderKL folder)")
    set_name = ev.prompt_set.split(":", 1)[0]
    if set_name not in PROMPT_SETS:
        problems.append(f"eval.prompt_set: unknown prompt set {set_name!r} (known: {', '.join(PROMPT_SETS)})")
    if params.data.domain == "import" and not params.data.import_uri:
        problems.append(
            "data.import_uri: required when data.domain is 'import' (a folder or s3:// prefix of .tar files)"
        )
    problems += _domain_problems(params)
    return problems


# --------------------------------------------------------------------------- I/O probes
def _probe_local_dir(field: str, folder: Path) -> str | None:
    """Create ``folder`` if needed and write-and-delete a probe file in it; a problem line or ``None``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".miroflow-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{field}: cannot write to {folder} ({type(e).__name__}: {e.strerror or e})"
    return None


def _probe_storage(root: str, storage: Storage) -> str | None:
    """Write and delete a probe object under ``storage.root``; a problem line or ``None``."""
    local = storage.local_path(root)
    if local is not None:
        return _probe_local_dir("storage.root", local)
    probe = join_uri(root, f".miroflow-probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except StorageError as e:
        if e.exit_code != 2:  # unreachable / refused: an operational failure, not a params problem
            raise
        return f"storage.root: cannot write to {root} ({e})"
    return None


def _sqlite_folder(uri: str) -> Path | None:
    """The folder of a local MLflow database / file store URI, else ``None`` (a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" not in uri:
        return Path(uri)
    return None


def _checkpoint_problem(params: Params, storage: Storage) -> str | None:
    """Whether evaluate/sweep/tts has a complete checkpoint (``miro.json``) to load; a problem line or ``None``."""
    try:
        if params.eval.checkpoint:
            if storage.exists(join_uri(params.eval.checkpoint, "miro.json")):
                return None
            return f"eval.checkpoint: {params.eval.checkpoint} is not a complete checkpoint (no miro.json)"
        run = run_uri(params)
        if storage.exists(join_uri(run, "final", "miro.json")) or latest_checkpoint(run, storage) is not None:
            return None
    except StorageError as e:
        if e.exit_code != 2:
            raise
        return f"eval.checkpoint: {e}"
    return (
        f"eval.checkpoint: is null and run {run} has no final/ or complete checkpoints/step-*/ (miro.json); "
        "train first or set eval.checkpoint"
    )


def preflight(params: Params, stage: str, storage: Storage | None = None, model_given: bool = False) -> None:
    """Check ``params`` for ``stage`` before any work; raise :class:`PreflightError` listing every problem.

    Args:
        params: the whole config.
        stage: one of :data:`STAGES`.
        storage: the storage the stage will use (default: built from ``params.storage``).
        model_given: the caller passes an already loaded model (no checkpoint is needed).
    """
    if stage not in STAGES:
        raise ValueError(f"preflight: unknown stage {stage!r} (known: {', '.join(STAGES)})")
    st = storage or from_config(params.storage)
    problems = check_params(params)
    data_manifest = Path(params.data.manifest)
    manifest_dir = data_manifest.parent
    if stage in _WRITES_STORAGE:
        problems.append(_probe_storage(params.storage.root, st) or "")
    problems.append(_probe_local_dir("data.manifest", manifest_dir) or "")
    if stage in ("score", "bin"):
        problems.append(_probe_local_dir("score.manifest", Path(params.score.manifest).parent) or "")
    if stage in ("score", "embed", "train") and not data_manifest.is_file():
        problems.append(f"data.manifest: {data_manifest} does not exist (run the prepare stage first)")
    if stage == "bin" and not Path(params.score.manifest).is_file():
        problems.append(f"score.manifest: {params.score.manifest} does not exist (run the score stage first)")
    if stage == "train" and params.train.rewards != [] and not Path(params.score.bins).is_file():
        problems.append(f"score.bins: {params.score.bins} does not exist (run the score and bin stages first)")
    if stage == "train" and params.train.latent == "vae" and params.train.vae and data_manifest.is_file():
        problems.append(vae_embed_problem(params) or "")  # latents and channel stats of train.vae
    if stage in _TRACKED and params.tracking.enabled:
        folder = _sqlite_folder(resolve_tracking_uri(params.tracking))
        if folder is not None:
            problems.append(_probe_local_dir("tracking.tracking_uri", folder) or "")
    if stage in _NEEDS_MODEL:
        if not model_given:  # presence only: the loader verifies hashes once, when it reads the files
            problems.append(_checkpoint_problem(params, st) or "")
        if params.data.domain == "import" and params.eval.prompt_set.split(":", 1)[0] == "shapes":
            problems.append(
                f"eval.prompt_set: {params.eval.prompt_set!r} holds shapes captions; not valid for "
                "data.domain=import (give your own prompts: txt:<file> with one prompt per line, "
                "parti:<file> or geneval:<file>)"
            )
        else:
            try:
                load_prompt_set(params.eval.prompt_set, params.eval.num_prompts, storage=st)
            except (PromptSetError, StorageError, OSError) as e:
                problems.append(f"eval.prompt_set: {e}")
    problems = [p for p in problems if p]
    if problems:
        raise PreflightError(stage, problems)
