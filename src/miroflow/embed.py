"""Stage embed (optional): text-embedding sidecars (and VAE latents) for every shard.

Layout (docs/architecture.md, "Text-embedding sidecars")::

    <root>/embeds/<data-hash>/<encoder-slug>/<shard-stem>.safetensors      one sidecar per shard
    <root>/embeds/<data-hash>/<encoder-slug>/latent_stats.json     per-channel {"mean","std",...} (vae)

The sidecar content (tensors ``tokens [N, L, D]``, ``mask [N, L]``, ``pooled [N, Dp]``, optional
``syn_*`` and, for VAE latents, the posterior's ``latents_mean`` / ``latents_std [N, C, h, w]``
fp16, plus string metadata) is defined, read and written by :mod:`miroflow.data.sidecars`.
``latent_stats.json`` holds the per-channel population mean/std of the latents training samples
(``z = mean + std·ε``): ``E[z] = E[mean]`` and ``Var[z] = Var[mean] + E[std²]``, exact from the
per-shard sums (docs/architecture.md, "Text-embedding sidecars"). Row ``i`` belongs to the ``i``-th
key of the shard in order.
Idempotent: a sidecar whose header already records the same encoder spec, max_length and VAE (and,
for a VAE, ``posterior: mean+std``; an older mean-only sidecar is recomputed) is not recomputed
(only its header is read). Sidecars are written in one ``Storage.write_bytes`` (atomic),
so a half-written one is never visible. The local manifest ``<dir of data.manifest>/embeds.json``
lists them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from miroflow.config import Params
from miroflow.data.hashing import data_hash
from miroflow.data.shards import decode_image, iter_shard, read_manifest
from miroflow.data.sidecars import (
    EMBED_FORMAT,
    POSTERIOR,
    embeds_manifest_path,
    encode_captions,
    read_sidecar_header,
    record_captions,
    sidecar_bytes,
)
from miroflow.models import create_codec, create_text_encoder
from miroflow.models.text import TextEncoder
from miroflow.storage import Storage, from_config, join_uri

__all__ = [
    "encoder_slug",
    "embeds_prefix",
    "embeds_manifest_path",
    "sidecar_uri",
    "embed_shard",
    "run_embed",
]

log = logging.getLogger(__name__)

#: Per-shard latent sums of the sidecar metadata (see :func:`embed_shard`).
_SUMS = ("latent_sum", "latent_sumsq", "latent_varsum", "latent_count")


def encoder_slug(spec: str) -> str:
    """Filesystem-safe name of an encoder spec: ``minilm`` → ``minilm``; ``t5:/a/b`` → ``t5-b-<hash8>``."""
    if ":" not in spec:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec)
    kind, arg = spec.split(":", 1)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}-{PurePosixPath(arg).name}")
    return f"{base.strip('-')}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def embeds_prefix(params: Params) -> str:
    """``<root>/embeds/<data-hash>/<encoder-slug>``."""
    return join_uri(params.storage.root, "embeds", data_hash(params.data), encoder_slug(params.train.text_encoder))


def sidecar_uri(params: Params, shard_uri: str) -> str:
    """Sidecar URI of one shard (``<prefix>/<shard-stem>.safetensors``)."""
    stem = PurePosixPath(shard_uri.rstrip("/")).name
    stem = stem[: -len(".tar")] if stem.endswith(".tar") else stem
    return join_uri(embeds_prefix(params), f"{stem}.safetensors")


def _images_tensor(recs: list[dict[str, Any]]) -> torch.Tensor:
    """Decode shard records to ``[N, 3, H, W]`` float32 in [0, 1]."""
    arrs = [decode_image(r["image_bytes"], name=f"{r['shard']} key {r['key']!r}") for r in recs]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def embed_shard(
    shard_uri: str,
    out_uri: str,
    encoder: TextEncoder,
    spec: str,
    storage: Storage,
    vae: Any | None = None,
    vae_spec: str = "",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Write (or skip) the sidecar of one shard.

    Args:
        vae: a :class:`~miroflow.models.vae.VAECodec` for latent sidecars, or None.

    Returns:
        ``{"shard", "uri", "n", "skipped"}`` and, for a VAE, ``"latent_sum"``, ``"latent_sumsq"``,
        ``"latent_varsum"`` (``[C]`` sums of the posterior means, their squares and the posterior
        variances) and ``"latent_count"`` (elements per channel).
    """
    want = {"encoder": spec, "max_length": str(encoder.max_length), "vae": vae_spec, "format": str(EMBED_FORMAT)}
    if vae is not None:  # a sidecar with only the posterior mean (older layout) is recomputed
        want["posterior"] = POSTERIOR
    head = read_sidecar_header(out_uri, storage)
    if head is not None and all(head.get(k) == v for k, v in want.items()):
        n = len(json.loads(head["keys"]))
        entry: dict[str, Any] = {"shard": shard_uri, "uri": out_uri, "n": n, "skipped": True}
        for k in _SUMS:
            if k in head:
                entry[k] = json.loads(head[k])
        return entry
    recs = list(iter_shard(shard_uri, storage))
    if not recs:
        raise ValueError(f"shard {shard_uri} has no samples to embed")
    caps = [record_captions(r) for r in recs]
    tensors = encode_captions(encoder, [c for c, _ in caps])
    syns = [s for _, s in caps]
    if any(s is not None for s in syns):
        syn = encode_captions(encoder, [s if s is not None else c for c, s in caps])
        tensors.update({f"syn_{k}": v for k, v in syn.items()})
    meta = dict(want, keys=json.dumps([r["key"] for r in recs]))
    entry = {"shard": shard_uri, "uri": out_uri, "n": len(recs), "skipped": False}
    if vae is not None:
        posts = [
            vae.encode_posterior(_images_tensor(recs[i : i + batch_size])) for i in range(0, len(recs), batch_size)
        ]
        mean = torch.cat([m.cpu() for m, _ in posts]).to(torch.float16)
        std = torch.cat([s.cpu() for _, s in posts]).to(torch.float16)
        z, var = mean.double(), std.double() ** 2  # the stats describe the stored (fp16) values
        entry.update(
            latent_sum=z.sum(dim=(0, 2, 3)).tolist(),
            latent_sumsq=(z * z).sum(dim=(0, 2, 3)).tolist(),
            latent_varsum=var.sum(dim=(0, 2, 3)).tolist(),
            latent_count=int(z.shape[0] * z.shape[2] * z.shape[3]),
        )
        tensors["latents_mean"], tensors["latents_std"] = mean.contiguous(), std.contiguous()
        meta.update({k: json.dumps(entry[k]) for k in _SUMS})
    storage.write_bytes(out_uri, sidecar_bytes(tensors, meta))
    return entry


def _latent_stats(entries: list[dict[str, Any]], vae_spec: str) -> dict[str, Any]:
    """Per-channel population mean/std ``[C]`` of the sampled latents ``z = mean + std·ε`` from the
    per-shard sums (float64): ``E[z] = E[mean]``, ``Var[z] = Var[mean] + E[std²]``."""
    s = np.sum([e["latent_sum"] for e in entries], axis=0)
    sq = np.sum([e["latent_sumsq"] for e in entries], axis=0)
    var_post = np.sum([e["latent_varsum"] for e in entries], axis=0)
    n = float(sum(e["latent_count"] for e in entries))
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean * mean + var_post / n, 1e-12))
    return {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "channels": len(mean),
        "source": f"fit:{int(n)}",
        "of": "posterior samples",
        "vae": vae_spec,
    }


def run_embed(params: Params, storage: Storage | None = None) -> dict[str, Any]:
    """Stage embed: sidecars for every shard of ``data.manifest``; writes ``manifests/embeds.json``.

    Uses ``train.text_encoder`` (must be a frozen encoder: ``learned`` trains with the denoiser and
    has nothing to precompute) and, for ``train.latent == "vae"``, ``train.vae``.

    Returns:
        The manifest ``{"version", "encoder", "max_length", "data_hash", "latent", "vae",
        "latent_stats_uri", "sidecars": [{"shard", "uri", "n"}]}``.
    """
    storage = storage or from_config(params.storage)
    spec = params.train.text_encoder
    if spec == "learned":
        raise ValueError("train.text_encoder: 'learned' is trained with the denoiser; there is nothing to embed")
    shards = read_manifest(params.data.manifest)["shards"]
    device = params.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = create_text_encoder(spec, device=device)
    vae = None
    vae_spec = ""
    if params.train.latent == "vae":
        if not params.train.vae:
            raise ValueError("train.vae: required when train.latent is 'vae'")
        vae, vae_spec = create_codec("vae", params.train.vae, device=device), params.train.vae
    entries = [
        embed_shard(s["uri"], sidecar_uri(params, s["uri"]), encoder, spec, storage, vae=vae, vae_spec=vae_spec)
        for s in tqdm(shards, desc="embed shards", unit="shard")
    ]
    stats_uri = None
    if vae is not None:
        stats_uri = join_uri(embeds_prefix(params), "latent_stats.json")
        stats = _latent_stats(entries, vae_spec)
        storage.write_bytes(stats_uri, (json.dumps(stats, indent=2) + "\n").encode())
    manifest = {
        "version": EMBED_FORMAT,
        "encoder": spec,
        "max_length": int(encoder.max_length),
        "data_hash": data_hash(params.data),
        "latent": params.train.latent,
        "vae": params.train.vae if vae is not None else None,
        "latent_stats_uri": stats_uri,
        "sidecars": [{"shard": e["shard"], "uri": e["uri"], "n": int(e["n"])} for e in entries],
    }
    path = embeds_manifest_path(params)
    Storage(retries=0).write_bytes(str(path), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    log.info("embedded %d shard(s), %d already up to date", len(entries), sum(e["skipped"] for e in entries))
    return manifest
