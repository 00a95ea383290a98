"""Loading a :class:`~miroflow.pipeline.MiroPipeline` from a pipeline directory or a training checkpoint.

:func:`load_pipeline` reads a directory in the checkpoint layout (:mod:`miroflow.pipeline_spec`) from
any storage URI — ``miro.json`` and the ``ema/`` or ``denoiser/`` weights — and rebuilds the text
encoder and the latent codec from the spec (a learned encoder and a ``vae/`` folder come from the
directory).

A checkpoint's ``miro.json`` carries a hash record (``files``: sha256 + size per file); the files a
load reads are checked against it first (:class:`~miroflow.storage.IntegrityError` naming the
checkpoint and the file). Unreadable safetensors and weights that do not fit their config give a
one-line error naming the file, never a page of state-dict keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from miroflow.models.denoiser import CONFIG_NAME, WEIGHTS_NAME, DenoiserConfig, MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder, TextEncoder, create_text_encoder
from miroflow.models.vae import PixelCodec, VAECodec
from miroflow.pipeline_spec import LATENT_STATS_JSON, MIRO_JSON, MiroSpec
from miroflow.storage import IntegrityError, Storage, join_uri, parse_uri, verify_file_records

if TYPE_CHECKING:  # pragma: no cover
    from miroflow.pipeline import MiroPipeline

__all__ = ["load_pipeline"]

#: ``miro.json`` key of a training checkpoint's hash record (``miroflow.checkpoint.FILES_KEY``).
FILES_KEY = "files"
_T = TypeVar("_T")


# --------------------------------------------------------------------------- loading helpers
@contextmanager
def _materialize(uri: str, storage: Storage, wanted: tuple[str, ...]) -> Iterator[Path]:
    """A local directory holding ``uri``'s files under the top-level names in ``wanted``.

    An entry ``"a|b"`` downloads ``a`` if it exists, else ``b``. Local URIs are used in place;
    remote ones are downloaded to a temporary directory (deleted on exit).
    """
    local = storage.local_path(uri)
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(f"model directory not found: {uri}")
        yield local
        return
    parse_uri(uri)
    prefix = uri.rstrip("/") + "/"
    objects = {obj[len(prefix) :]: obj for obj in storage.list(prefix) if obj.startswith(prefix)}
    tops = {rel.split("/", 1)[0] for rel in objects}
    # the first of an alternative group "a|b" that exists is downloaded (e.g. ema|denoiser)
    chosen: list[str] = []
    for w in wanted:
        options = w.split("|")
        chosen.append(next((o for o in options if o in tops), options[0]))
    with tempfile.TemporaryDirectory(prefix="miroload-") as tmp:
        root = Path(tmp)
        storage.download_tree(uri, root, select=lambda rel: rel.split("/", 1)[0] in chosen)
        yield root


def _load_checked(
    uri: str, folder: Path, files: tuple[str, str], load: Callable[[Path], _T], build: Callable[[Path], torch.nn.Module]
) -> _T:
    """``load(folder)`` (a ``from_pretrained``) with one-line errors naming the file of ``uri``.

    ``files`` = ``(config, weights)`` names in ``folder``; ``build(folder)`` builds the module the
    config describes (only to describe a state-dict mismatch: counts, at most 3 keys of each kind).
    """
    config, weights = files
    rel = f"{folder.name}/{weights}"
    try:
        return load(folder)
    except SafetensorError as err:
        msg = f"{join_uri(uri, rel)} is not a readable safetensors file ({err})"
        raise IntegrityError(msg, uri, rel) from None
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        try:
            with safe_open(str(folder / weights), framework="pt") as f:
                found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            want = {k: list(v.shape) for k, v in build(folder).state_dict().items()}
        except Exception:  # describing the mismatch must not hide it
            raise IntegrityError(f"{uri}: {rel}: {str(err).splitlines()[0]}", uri, rel) from None
        missing = sorted(set(want) - set(found))
        unexpected = sorted(set(found) - set(want))
        reshaped = [f"{k} {found[k]} vs {want[k]}" for k in sorted(set(want) & set(found)) if want[k] != found[k]]
        groups = {"missing key(s)": missing, "unexpected key(s)": unexpected, "of another shape": reshaped}
        summary = "; ".join(
            f"{len(keys)} {what}: {', '.join(keys[:3])}{f', ... (+{len(keys) - 3} more)' if len(keys) > 3 else ''}"
            for what, keys in groups.items()
            if keys
        )
        raise IntegrityError(
            f"{uri}: the weights {rel} do not fit {folder.name}/{config}: {summary}", uri, rel
        ) from None


def _learned_dir(spec: MiroSpec, d: Path, prefer_ema: bool) -> Path | None:
    """The folder of a ``learned`` text encoder (EMA one first when ``prefer_ema``); None for frozen encoders."""
    if spec.text_encoder != "learned":
        return None
    order = ("ema_text_encoder", "text_encoder") if prefer_ema else ("text_encoder", "ema_text_encoder")
    sub = next((d / s for s in order if (d / s / "text_encoder.json").is_file()), None)
    if sub is None:
        raise FileNotFoundError(f"miro.json says text_encoder='learned' but {d} has no {' or '.join(order)}/ folder")
    return sub


def _build_text_encoder(uri: str, spec: MiroSpec, sub: Path | None, device: torch.device) -> TextEncoder:
    if sub is not None:
        enc = _load_checked(
            uri,
            sub,
            ("text_encoder.json", "text_encoder.safetensors"),
            LearnedTokenEncoder.from_pretrained,
            lambda f: LearnedTokenEncoder(**json.loads((f / "text_encoder.json").read_text())),
        )
        enc.to(device)
        return enc
    return create_text_encoder(spec.text_encoder, device=device, max_length=spec.text_max_length)


def _build_codec(spec: MiroSpec, d: Path, device: torch.device) -> PixelCodec | VAECodec:
    if spec.latent == "pixel":
        return PixelCodec()
    local_vae = d / "vae"
    if (local_vae / "config.json").is_file():
        codec = VAECodec(str(local_vae), device=device)
        if (local_vae / LATENT_STATS_JSON).is_file():
            codec.load_stats(local_vae / LATENT_STATS_JSON)
    elif spec.vae:
        codec = VAECodec(spec.vae, device=device)
    else:
        raise ValueError("miro.json: latent='vae' but 'vae' is null and the directory has no vae/ folder")
    stats = spec.latent_stats
    if stats and isinstance(stats.get("mean"), list) and isinstance(stats.get("std"), list):
        if len(stats["mean"]) != codec.channels or len(stats["std"]) != codec.channels:
            raise ValueError(f"miro.json: latent_stats must hold {codec.channels} means and stds")
        codec.mean = torch.tensor(stats["mean"], dtype=torch.float32, device=codec.device)
        codec.std = torch.tensor(stats["std"], dtype=torch.float32, device=codec.device)
        codec.stats_source = "miro.json"
    return codec


@contextmanager
def _registered_model(uri: str, tracking_uri: str | None) -> Iterator[str]:
    """Download ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` into a temporary folder."""
    import mlflow  # lazy: mlflow takes seconds to import; only registry URIs need it
    from mlflow.exceptions import MlflowException  # lazy, as above

    server = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not server:
        raise ValueError(f"{uri}: a registry URI needs MLFLOW_TRACKING_URI (or tracking_uri=) naming the MLflow server")
    with tempfile.TemporaryDirectory(prefix="miroflow-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=server)
        except MlflowException as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(f"{uri}: not found in the model registry at {server}: {first}") from None
        yield local


def load_pipeline(
    uri: str,
    storage: Storage | None = None,
    device: str | torch.device | None = None,
    prefer: Literal["ema", "denoiser"] = "ema",
    tracking_uri: str | None = None,
) -> MiroPipeline:
    """Load a pipeline directory or a checkpoint from any storage URI, or a registered model version.

    ``uri`` may be ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (e.g.
    ``models:/miro-shapes@candidate``): the version's files are downloaded from the MLflow registry
    at ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``) and loaded like a checkpoint.

    Weights come from ``<uri>/<prefer>/`` when present, else from the other of ``ema/`` /
    ``denoiser/`` (a pipeline directory has only ``denoiser/``; a checkpoint has both and is
    evaluated with ``ema/``). ``device`` defaults to CUDA when available.

    Raises:
        FileNotFoundError: naming the missing ``miro.json`` or weights folder.
        IntegrityError: a file it reads fails the checkpoint's hash record, is not readable
            safetensors, or holds weights that do not fit its config (names the file).
        ValueError: an invalid ``miro.json`` (names the file) or inconsistent components.
    """
    from miroflow.pipeline import MiroPipeline  # lazy: miroflow.pipeline imports this module at its top

    if uri.startswith("models:/"):
        with _registered_model(uri, tracking_uri) as local:
            return load_pipeline(local, storage, device, prefer)
    st = storage or Storage()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if prefer == "ema":
        wanted: tuple[str, ...] = (MIRO_JSON, "ema|denoiser", "ema_text_encoder|text_encoder", "vae")
    else:
        wanted = (MIRO_JSON, "denoiser|ema", "text_encoder|ema_text_encoder", "vae")
    with _materialize(uri, st, wanted) as d:
        meta = d / MIRO_JSON
        if not meta.is_file():
            raise FileNotFoundError(
                f"{join_uri(uri, MIRO_JSON)} not found: not a MiroPipeline directory or an incomplete checkpoint "
                "(miro.json is written last)"
            )
        try:
            raw = json.loads(meta.read_text())
            spec = MiroSpec.model_validate(raw)
        except ValueError as err:
            raise ValueError(f"{join_uri(uri, MIRO_JSON)}: invalid miro.json: {err}") from None
        order = ("ema", "denoiser") if prefer == "ema" else ("denoiser", "ema")
        weights = next(
            (d / s for s in order if (d / s / CONFIG_NAME).is_file() and (d / s / WEIGHTS_NAME).is_file()), None
        )
        if weights is None:
            raise FileNotFoundError(f"{uri}: no weights ({' or '.join(f'{s}/{WEIGHTS_NAME}' for s in order)})")
        text_dir = _learned_dir(spec, d, prefer_ema=weights.name == "ema")
        record: Any = raw.get(FILES_KEY) if isinstance(raw, dict) else None
        if record is not None:  # a training checkpoint: check the files read below
            used = {weights.name, "vae"} | ({text_dir.name} if text_dir is not None else set())
            verify_file_records(d, record, uri, lambda rel: rel.split("/", 1)[0] in used, kind="checkpoint")
        denoiser = _load_checked(
            uri,
            weights,
            (CONFIG_NAME, WEIGHTS_NAME),
            lambda f: MiroDenoiser.from_pretrained(f, device=dev),
            lambda f: MiroDenoiser(DenoiserConfig.model_validate_json((f / CONFIG_NAME).read_text())),
        )
        if spec.denoiser is not None:
            stored = DenoiserConfig.model_validate(spec.denoiser)
            if stored.reward_names != denoiser.reward_names:
                raise ValueError(
                    f"{uri}: miro.json denoiser.reward_names {stored.reward_names} differ from "
                    f"{weights.name}/config.json {denoiser.reward_names}"
                )
        text_encoder = _build_text_encoder(uri, spec, text_dir, dev)
        codec = _build_codec(spec, d, dev)
        spec_data = spec.model_dump(mode="json")
        spec_data.pop("pipeline", None)  # regenerated on save
        spec_data.pop(FILES_KEY, None)  # describes the checkpoint's files, not a directory saved from this pipeline
        pipe = MiroPipeline(denoiser=denoiser, text_encoder=text_encoder, vae=codec, spec=spec_data)
    pipe.to(dev)
    return pipe
