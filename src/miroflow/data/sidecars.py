"""Text-embedding sidecars: the safetensors files written by the embed stage, read by the trainer.

One sidecar per shard (layout: :mod:`miroflow.embed`); row ``i`` belongs to the ``i``-th key of the
shard in order::

    tokens      [N, L, D]  float16   (zero where mask is False)
    mask        [N, L]     bool
    pooled      [N, Dp]    float32
    syn_tokens / syn_mask / syn_pooled      only when the shard has synthetic captions
    latents_mean, latents_std  [N, C, h, w] float16   only for train.latent == "vae": the VAE
                posterior's mean and std (raw, un-normalised); training draws mean + std·ε per step
    latents     [N, C, h, w] float16        older sidecars: the posterior mean alone (read as std 0)
  metadata (all str): keys (JSON list), encoder (spec), max_length, vae (path or ""), format,
            for vae: posterior ("mean+std"), latent_sum / latent_sumsq / latent_varsum (JSON [C]
            float64: sums of the means, their squares and the posterior variances), latent_count (int)

:func:`posterior_latents` reads either layout as one ``[N, 2, C, h, w]`` tensor
(docs/architecture.md, "Text-embedding sidecars").

Also here: the caption of a shard record (:func:`record_captions`) and caption encoding with a
frozen text encoder (:func:`encode_captions`), shared by the embed stage and the trainer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save

from miroflow.config import Params
from miroflow.storage import Storage

if TYPE_CHECKING:  # pragma: no cover
    from miroflow.models.text import TextEncoder

__all__ = [
    "EMBED_FORMAT",
    "POSTERIOR",
    "embeds_manifest_path",
    "posterior_latents",
    "vae_embed_problem",
    "read_sidecar_header",
    "read_sidecar",
    "sidecar_bytes",
    "encode_captions",
    "record_captions",
]

#: Version of the sidecar layout recorded in its metadata (``format``).
EMBED_FORMAT = 1
_MAX_HEADER = 100_000_000
#: Metadata value ``posterior`` of a sidecar holding ``latents_mean`` and ``latents_std``.
POSTERIOR = "mean+std"


def embeds_manifest_path(params: Params) -> Path:
    """Local manifest of the embed stage: ``embeds.json`` next to ``data.manifest``."""
    return Path(params.data.manifest).parent / "embeds.json"


def posterior_latents(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The VAE posterior of a sidecar's rows as one ``float16 [N, 2, C, h, w]`` tensor (index 0 of
    dim 1 = mean, 1 = std), or ``None`` when the sidecar has no latents.

    A sidecar written before the posterior's std was stored has only ``latents`` (the mean): it is
    read as a posterior with std 0, i.e. a deterministic latent, so old data still trains.
    """
    if "latents_mean" in tensors and "latents_std" in tensors:
        mean, std = tensors["latents_mean"], tensors["latents_std"]
        if mean.shape != std.shape:
            raise ValueError(f"sidecar: latents_mean {tuple(mean.shape)} and latents_std {tuple(std.shape)} differ")
    elif "latents" in tensors:
        mean = tensors["latents"]
        std = torch.zeros_like(mean)
    else:
        return None
    return torch.stack([mean.to(torch.float16), std.to(torch.float16)], dim=1)


def vae_embed_problem(params: Params) -> str | None:
    """Why ``train.latent: vae`` cannot train on the embed stage's output, as one line naming the fix,
    or ``None`` when ``embeds.json`` records VAE latents and channel stats of ``train.vae``."""
    tp = params.train
    path = embeds_manifest_path(params)
    fix = f"run the embed stage with train.latent=vae train.vae={tp.vae} first (miroflow embed)"
    if not path.is_file():
        return f"train.latent: 'vae' trains on the embed stage's VAE latents, but {path} does not exist; {fix}"
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"train.latent: 'vae' needs the embed manifest {path}, which is unreadable ({err}); {fix}"
    if not isinstance(man, dict) or man.get("latent") != "vae" or not man.get("latent_stats_uri"):
        return f"train.latent: 'vae', but {path} holds no VAE latents (embedded with train.latent=pixel); {fix}"
    if man.get("encoder") != tp.text_encoder:
        return (
            f"train.text_encoder: {tp.text_encoder!r}, but the VAE latents of {path} were embedded with "
            f"{man.get('encoder')!r}; {fix}"
        )
    if man.get("vae") != tp.vae:
        return f"train.vae: {tp.vae!r}, but the latents of {path} were encoded with VAE {man.get('vae')!r}; {fix}"
    return None


def read_sidecar_header(uri: str, storage: Storage) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of a sidecar (reads only the header), or ``None`` if absent.

    Raises:
        ValueError: the object exists but is not a safetensors file (names the URI).
    """
    if not storage.exists(uri):
        return None
    f = storage.open_read(uri)
    try:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"sidecar {uri} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"sidecar {uri}: implausible safetensors header size {n}")
        header = json.loads(f.read(n).decode("utf-8"))
    finally:
        f.close()
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def read_sidecar(uri: str, storage: Storage) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors (see the module docstring for names and shapes) and the metadata of a sidecar."""
    data = storage.read_bytes(uri)
    tensors = load(data)
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in meta.items()}


def sidecar_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise a sidecar (tensors as in the module docstring, string metadata) to safetensors bytes."""
    return save(tensors, metadata=metadata)


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Encode captions with a frozen encoder, each distinct caption once.

    Returns:
        ``tokens [N, L, D]`` float16, ``mask [N, L]`` bool, ``pooled [N, Dp]`` float32 (CPU).

    Raises:
        ValueError: ``captions`` is empty.
    """
    uniq = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(uniq)}
    toks, masks, pools = [], [], []
    for i in range(0, len(uniq), batch_size):
        emb = encoder.encode(uniq[i : i + batch_size])
        toks.append(emb.tokens.detach().to("cpu", torch.float16))
        masks.append(emb.mask.detach().to("cpu", torch.bool))
        pools.append(emb.pooled.detach().to("cpu", torch.float32))
    if not uniq:
        raise ValueError("encode_captions: no captions")
    idx = torch.tensor([where[c] for c in captions], dtype=torch.long)
    return {
        "tokens": torch.cat(toks)[idx].contiguous(),
        "mask": torch.cat(masks)[idx].contiguous(),
        "pooled": torch.cat(pools)[idx].contiguous(),
    }


def record_captions(rec: dict[str, Any]) -> tuple[str, str | None]:
    """``(original caption, synthetic caption or None)`` of a shard record.

    The original caption is the ``.txt`` member (falling back to ``json["caption"]``).

    Raises:
        ValueError: there is no caption at all (names the shard and key).
    """
    meta = rec.get("json") or {}
    cap = rec.get("txt")
    if not cap:
        cap = meta.get("caption")
    if not isinstance(cap, str) or not cap:
        raise ValueError(f"shard {rec.get('shard')} key {rec.get('key')!r}: no caption (.txt or json caption)")
    syn = (meta.get("captions") or {}).get("synthetic") if isinstance(meta.get("captions"), dict) else None
    return cap, syn if isinstance(syn, str) and syn else None
