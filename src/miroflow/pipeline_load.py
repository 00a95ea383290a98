"""Loading a :class:`~miroflow.pipeline.MiroPipeline` from a pipeline directory or a training checkpoint.

:func:`load_pipeline` reads a directory in the checkpoint layout (:mod:`miroflow.pipeline_spec`) from
any storage URI — ``miro.json`` and the ``ema/`` or ``denoiser/`` weights — and rebuilds the text
encoder and the latent codec from the spec (a learned encoder and a ``vae/`` folder come from the
directory).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from miroflow.models.denoiser import CONFIG_NAME, WEIGHTS_NAME, DenoiserConfig, MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder, TextEncoder, create_text_encoder
from miroflow.models.vae import PixelCodec, VAECodec
from miroflow.pipeline_spec import LATENT_STATS_JSON, MIRO_JSON, MiroSpec
from miroflow.storage import Storage, join_uri, parse_uri

if TYPE_CHECKING:  # pragma: no cover
    from miroflow.pipeline import MiroPipeline

__all__ = ["load_pipeline"]


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


def _build_text_encoder(spec: MiroSpec, d: Path, device: torch.device, prefer_ema: bool) -> TextEncoder:
    if spec.text_encoder == "learned":
        order = ("ema_text_encoder", "text_encoder") if prefer_ema else ("text_encoder", "ema_text_encoder")
        sub = next((d / s for s in order if (d / s / "text_encoder.json").is_file()), None)
        if sub is None:
            raise FileNotFoundError(
                f"miro.json says text_encoder='learned' but {d} has no {' or '.join(order)}/ folder"
            )
        enc = LearnedTokenEncoder.from_pretrained(sub)
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


def load_pipeline(
    uri: str,
    storage: Storage | None = None,
    device: str | torch.device | None = None,
    prefer: Literal["ema", "denoiser"] = "ema",
) -> MiroPipeline:
    """Load a pipeline directory or a checkpoint from any storage URI.

    Weights come from ``<uri>/<prefer>/`` when present, else from the other of ``ema/`` /
    ``denoiser/`` (a pipeline directory has only ``denoiser/``; a checkpoint has both and is
    evaluated with ``ema/``). ``device`` defaults to CUDA when available.

    Raises:
        FileNotFoundError: naming the missing ``miro.json`` or weights folder.
        ValueError: an invalid ``miro.json`` (names the file) or inconsistent components.
    """
    from miroflow.pipeline import MiroPipeline  # lazy: miroflow.pipeline imports this module at its top

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
        denoiser = MiroDenoiser.from_pretrained(weights, device=dev)
        if spec.denoiser is not None:
            stored = DenoiserConfig.model_validate(spec.denoiser)
            if stored.reward_names != denoiser.reward_names:
                raise ValueError(
                    f"{uri}: miro.json denoiser.reward_names {stored.reward_names} differ from "
                    f"{weights.name}/config.json {denoiser.reward_names}"
                )
        text_encoder = _build_text_encoder(spec, d, dev, prefer_ema=weights.name == "ema")
        codec = _build_codec(spec, d, dev)
        spec_data = spec.model_dump(mode="json")
        spec_data.pop("pipeline", None)  # regenerated on save
        pipe = MiroPipeline(denoiser=denoiser, text_encoder=text_encoder, vae=codec, spec=spec_data)
    pipe.to(dev)
    return pipe
