"""Training data: shards + score tables + bins (+ embedding sidecars), indexed and in memory.

For the small domains (shapes, tiny imports) every image is decoded **once** at load time and held
as ``uint8 [N, H, W, 3]`` (or, with VAE sidecars, the raw latent posterior ``float16 [N, 2, C, h, w]``:
index 0 of dim 1 the mean, 1 the std; training samples ``mean + std·ε`` each step, see
:func:`miroflow.data.sidecars.posterior_latents`), together with per-sample conditioning:

* ``rewards [N, R]`` float32 — for each trained reward the bin-mapped value
  (:meth:`BinSet.transform_one`) of the score of the *original* caption; NaN = absent (no score,
  failed scorer, or the key missing from its table).
* ``syn_rewards [N, R]`` — the same for the *synthetic* caption: prompt-dependent rewards come from
  ``r@synthetic`` (NaN if that caption could not be scored), image-only rewards (no ``@synthetic``
  column) repeat the original value. ``None`` when the data has no synthetic captions.
* ``text`` / ``syn_text``: ``tokens [N, L, D]`` float16, ``mask [N, L]`` bool, ``pooled [N, Dp]``
  float32, from the embed stage's sidecars when they exist for the encoder spec, otherwise
  computed here with the (frozen) encoder; ``None`` for the trainable ``learned`` encoder
  (captions are encoded each step).

Deterministic order (:class:`GlobalBatchOrder`): sample position ``p = step·B + j`` of global step
``step`` maps to epoch ``e = p // N`` and index ``perm_e[p % N]`` with
``perm_e = torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))``. It depends only
on ``(seed, step, N, B)``; rank ``r`` of ``W`` takes ``[r·B/W, (r+1)·B/W)`` of every global batch,
so the global sample order does not depend on the world size and resuming needs only the step.

Large datasets stream instead (``train.data: stream``, :mod:`miroflow.data.stream`): same rows per
rank, bounded memory. It is our own equivalent of webdataset's ``split_by_node``/``split_by_worker``
over the same shard list (docs/architecture.md, "Training data"), read with our hardened tar reader,
because exact resume needs the sample position to be a function of the step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from miroflow.conditioning import BinSet
from miroflow.data.score_tables import SYNTHETIC_SUFFIX, finite_or_nan, load_score_table
from miroflow.data.shards import decode_image, iter_shard, read_manifest
from miroflow.data.sidecars import encode_captions, posterior_latents, read_sidecar, record_captions
from miroflow.storage import Storage

__all__ = [
    "SYNTHETIC_SUFFIX",
    "TextArrays",
    "Batch",
    "TrainData",
    "GlobalBatchOrder",
    "BatchSource",
    "MemorySource",
    "step_seed",
    "rank_slice",
    "reward_columns",
    "check_reward_inputs",
    "score_manifest_tables",
    "table_rows",
    "load_train_data",
]

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(seed, step, stream)`` (splitmix-style mixing)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % 2**64
    x ^= x >> 29
    return x % 2**63


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    """Rows ``[rank·B/W, (rank+1)·B/W)`` of a global batch; ``B`` must be divisible by ``W``."""
    if global_batch % world:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by the world size {world}")
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


class GlobalBatchOrder:
    """Indices of every global batch as a pure function of ``(seed, step, size, batch_size)``."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("GlobalBatchOrder: the dataset is empty")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        """``Tensor[B]`` int64 dataset indices of global step ``step`` (0-based)."""
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=torch.long)
        epochs, offsets = pos // self.size, pos % self.size
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


@dataclass
class TextArrays:
    """Precomputed text embeddings: ``tokens [N, L, D]`` fp16, ``mask [N, L]`` bool, ``pooled [N, Dp]`` fp32."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def select(self, idx: Tensor) -> "TextArrays":
        """Rows ``idx``."""
        return TextArrays(self.tokens[idx], self.mask[idx], self.pooled[idx])


@dataclass
class Batch:
    """One (micro-)batch of ``b`` samples.

    Attributes:
        x: ``uint8 [b, H, W, 3]`` images (pixel) or the raw latent posterior ``float16 [b, 2, C, h, w]``
            (vae: ``x[:, 0]`` mean, ``x[:, 1]`` std).
        captions: the caption actually used per sample.
        rewards: ``[b, R]`` float32 conditioning values (NaN = absent).
        text: precomputed embeddings of ``captions`` or None (learned encoder).
        keys: the samples' keys (for audits; None when not tracked).
    """

    x: Tensor
    captions: list[str]
    rewards: Tensor
    text: TextArrays | None
    keys: list[str] | None = None


@dataclass
class TrainData:
    """The in-memory training set (see module docstring for the fields' meaning)."""

    keys: list[str]
    images: Tensor | None
    latents: Tensor | None
    captions: list[str]
    syn_captions: list[str | None] | None
    reward_names: list[str]
    rewards: Tensor
    syn_rewards: Tensor | None
    text: TextArrays | None = None
    syn_text: TextArrays | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_synthetic(self) -> bool:
        """Whether any sample has a synthetic caption."""
        return self.syn_captions is not None

    def batch(self, idx: Tensor, use_syn: Tensor | None = None) -> Batch:
        """Gather samples ``idx [b]``; ``use_syn [b]`` bool picks the synthetic caption per sample.

        A sample without a synthetic caption always uses its original one.
        """
        idx = idx.long()
        x = self.images[idx] if self.images is not None else self.latents[idx]  # type: ignore[index]
        caps = [self.captions[i] for i in idx.tolist()]
        rew = self.rewards[idx].clone()
        text = self.text.select(idx) if self.text is not None else None
        if use_syn is not None and self.syn_captions is not None and bool(use_syn.any()):
            syn_ok = torch.tensor([self.syn_captions[i] is not None for i in idx.tolist()], dtype=torch.bool)
            pick = use_syn.bool() & syn_ok
            for j in torch.nonzero(pick).flatten().tolist():
                caps[j] = str(self.syn_captions[int(idx[j])])
            assert self.syn_rewards is not None
            rew[pick] = self.syn_rewards[idx][pick]
            if text is not None and self.syn_text is not None:
                syn = self.syn_text.select(idx)
                text = TextArrays(
                    torch.where(pick[:, None, None], syn.tokens, text.tokens),
                    torch.where(pick[:, None], syn.mask, text.mask),
                    torch.where(pick[:, None], syn.pooled, text.pooled),
                )
        return Batch(x=x, captions=caps, rewards=rew, text=text, keys=[self.keys[i] for i in idx.tolist()])


class BatchSource(Protocol):
    """Where a training run's batches come from: :class:`MemorySource` or the streaming source
    (:class:`miroflow.data.stream.StreamSource`); both give the same rows of a global step to a rank
    whatever the world size."""

    def __len__(self) -> int: ...

    def batch(self, step: int, rows: slice, use_syn: Tensor | None = None) -> Batch:
        """Rows ``rows`` of global step ``step``'s batch; ``use_syn [len(rows)]`` picks synthetic captions."""
        ...

    def close(self) -> None:
        """Release loader threads or files."""
        ...


class MemorySource:
    """Batches of an in-memory :class:`TrainData` in :class:`GlobalBatchOrder`."""

    def __init__(self, data: TrainData, batch_size: int, seed: int) -> None:
        self.data = data
        self.order = GlobalBatchOrder(len(data), batch_size, seed)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, step: int, rows: slice, use_syn: Tensor | None = None) -> Batch:
        """Rows ``rows`` of global step ``step`` (see :class:`BatchSource`)."""
        return self.data.batch(self.order.indices(step)[rows], use_syn)

    def close(self) -> None:
        """Nothing to release."""


def reward_columns(df: Any, name: str, binset: BinSet, table_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Bin-mapped ``(original, synthetic)`` conditioning values ``[n]`` of reward ``name`` in a score table.

    Image-only rewards (no ``name@synthetic`` column) return the original values twice. A ±inf score
    (it would silently land in the top bin) is a ``ScoreInputError`` naming the table and column.
    """
    if name not in df.columns:
        raise KeyError(f"score table {table_uri} has no column {name!r} (columns: {list(df.columns)})")
    orig = binset.transform_one(name, finite_or_nan(df, name, table_uri))
    syn_col = f"{name}{SYNTHETIC_SUFFIX}"
    syn = binset.transform_one(name, finite_or_nan(df, syn_col, table_uri)) if syn_col in df.columns else orig
    return orig, syn


def check_reward_inputs(reward_names: list[str], binset: BinSet | None, score_manifest: object, who: str) -> None:
    """Rewards need bins holding every one of them and a score manifest (``who`` names the caller).

    Raises:
        ValueError: no bins or no score manifest. KeyError: a reward missing from the bins (names both).
    """
    if not reward_names:
        return
    if binset is None or score_manifest is None:
        raise ValueError(f"{who}: rewards need a binset and a score manifest")
    unknown = [n for n in reward_names if n not in binset.rewards]
    if unknown:
        raise KeyError(f"train.rewards: {unknown} not in the bins (bins have: {binset.names})")


def score_manifest_tables(score_manifest: str | Path) -> list[dict[str, Any]]:
    """The ``tables`` entries (``{"shard", "uri", ...}``) of a local score manifest."""
    p = Path(score_manifest)
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"score manifest {p} does not exist (run the score stage first)") from None
    return list(manifest.get("tables", []))


def table_rows(
    df: Any, reward_names: list[str], binset: BinSet, table_uri: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``key -> (orig [R], syn [R])`` bin-mapped conditioning rows of one score table."""
    cols = [reward_columns(df, n, binset, table_uri) for n in reward_names]
    orig = np.stack([c[0] for c in cols], axis=1) if cols else np.zeros((len(df), 0))
    syn = np.stack([c[1] for c in cols], axis=1) if cols else np.zeros((len(df), 0))
    return {str(k): (orig[i], syn[i]) for i, k in enumerate(df["key"].tolist())}


def _load_scores(
    score_manifest: str | Path, reward_names: list[str], binset: BinSet, storage: Storage
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``shard uri -> {key -> (orig [R], syn [R])}`` conditioning rows from every score table."""
    return {
        t["shard"]: table_rows(load_score_table(t["uri"], storage), reward_names, binset, t["uri"])
        for t in score_manifest_tables(score_manifest)
    }


_SYN = ("syn_tokens", "syn_mask", "syn_pooled")
_LATENTS = ("latents", "latents_mean", "latents_std")


def _load_sidecar_text(
    embeds_manifest: Path,
    spec: str,
    shards: list[dict[str, Any]],
    keys: list[str],
    storage: Storage,
    syn_keys: frozenset[str] = frozenset(),
) -> tuple[TextArrays, TextArrays | None, Tensor | None, dict[str, Any]] | None:
    """Text arrays (+ the raw latent posterior ``[N, 2, C, h, w]``, :func:`posterior_latents`) from the
    embed stage's sidecars, or None if they do not match.

    The embed stage writes ``syn_*`` only for shards with synthetic captions. When some shards have
    them and others not, the rows of a shard without them repeat its original ``tokens``/``mask``/
    ``pooled`` (its samples have no synthetic caption, so :meth:`TrainData.batch` never picks those
    rows; the embed stage fills samples without one inside a shard the same way).

    Args:
        keys: the sample keys in training order (row ``i`` of the result is ``keys[i]``).
        syn_keys: the keys whose record has a synthetic caption.

    Raises:
        ValueError: a sidecar lacks keys of ``keys``, lacks ``syn_*`` although its shard has samples
            with a synthetic caption, or lacks tensors other shards' sidecars have (latents): a stale
            sidecar; the message names the shard.
    """
    if not embeds_manifest.is_file():
        return None
    man = json.loads(embeds_manifest.read_text())
    by_shard = {e["shard"]: e["uri"] for e in man.get("sidecars", [])}
    if man.get("encoder") != spec or any(s["uri"] not in by_shard for s in shards):
        return None
    loaded: list[tuple[str, list[str], dict[str, Tensor]]] = []  # (shard uri, its keys, its tensors)
    side_keys: list[str] = []
    for s in shards:
        tensors, meta = read_sidecar(by_shard[s["uri"]], storage)
        shard_keys = [str(k) for k in json.loads(meta["keys"])]
        side_keys += shard_keys
        post = posterior_latents(tensors)  # either sidecar layout -> "latents" [n, 2, C, h, w]
        rows = {k: v for k, v in tensors.items() if k not in _LATENTS}
        if post is not None:
            rows["latents"] = post
        loaded.append((s["uri"], shard_keys, rows))
    any_syn = any(all(k in t for k in _SYN) for _, _, t in loaded)
    for uri, shard_keys, tensors in loaded:
        if all(k in tensors for k in _SYN):
            continue
        with_syn = [k for k in shard_keys if k in syn_keys]
        if with_syn:
            raise ValueError(
                f"embedding sidecar of shard {uri} ({by_shard[uri]}) has no synthetic-caption embeddings, "
                f"but {len(with_syn)} of its samples have a synthetic caption (e.g. {with_syn[0]!r}); "
                "rerun the embed stage"
            )
        if any_syn:
            tensors.update({f"syn_{k}": tensors[k] for k in ("tokens", "mask", "pooled")})
    names = set().union(*(t.keys() for _, _, t in loaded)) if loaded else set()
    for uri, _, tensors in loaded:
        if set(tensors) != names:
            raise ValueError(
                f"embedding sidecar of shard {uri} ({by_shard[uri]}) lacks {sorted(names - set(tensors))} that "
                "other shards' sidecars have; rerun the embed stage"
            )
    parts: dict[str, list[Tensor]] = {}
    for _, _, tensors in loaded:
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
    pos = {k: i for i, k in enumerate(side_keys)}
    missing = [k for k in keys if k not in pos]
    if missing:
        raise ValueError(f"embedding sidecars in {embeds_manifest} lack key(s) {missing[:5]}; rerun the embed stage")
    idx = torch.tensor([pos[k] for k in keys], dtype=torch.long)
    cat = {k: torch.cat(v)[idx] for k, v in parts.items()}
    text = TextArrays(cat["tokens"], cat["mask"], cat["pooled"])
    syn = TextArrays(cat["syn_tokens"], cat["syn_mask"], cat["syn_pooled"]) if "syn_tokens" in cat else None
    return text, syn, cat.get("latents"), man


def load_train_data(
    shard_manifest: str | Path,
    storage: Storage,
    reward_names: list[str],
    binset: BinSet | None = None,
    score_manifest: str | Path | None = None,
    text_encoder: Any | None = None,
    text_spec: str | None = None,
    embeds_manifest: str | Path | None = None,
    latent: str = "pixel",
) -> TrainData:
    """Load every shard of ``shard_manifest`` into memory with its conditioning.

    Args:
        reward_names: trained rewards (column order of ``rewards``); ``[]`` = baseline (no scores read).
        binset: bins holding every reward of ``reward_names`` (required when non-empty).
        score_manifest: local score manifest (required when ``reward_names`` is non-empty).
        text_encoder: a frozen encoder to precompute embeddings with when no matching sidecars
            exist; ``None`` (or the ``learned`` encoder) leaves ``text`` empty.
        text_spec: the encoder spec sidecars must record to be used.
        embeds_manifest: the embed stage's local manifest (optional).
        latent: ``"pixel"`` keeps decoded images; ``"vae"`` requires latent sidecars.

    Raises:
        KeyError: a reward of ``reward_names`` is not in the bins (names it and the valid ones).
    """
    check_reward_inputs(reward_names, binset, score_manifest, "load_train_data")
    shards = read_manifest(shard_manifest)["shards"]
    scores = (
        _load_scores(score_manifest, reward_names, binset, storage)  # type: ignore[arg-type]
        if reward_names
        else {}
    )
    keys: list[str] = []
    images: list[np.ndarray] = []
    caps: list[str] = []
    syns: list[str | None] = []
    rows: list[np.ndarray] = []
    syn_rows: list[np.ndarray] = []
    nan_row = np.full(len(reward_names), np.nan)
    n_unscored = 0
    for s in tqdm(shards, desc="load train data", unit="shard"):
        table = scores.get(s["uri"], {})
        if reward_names and not table:
            log.warning("shard %s has no score table; its rewards are absent (NaN)", s["uri"])
        for rec in iter_shard(s["uri"], storage):
            try:
                name = f"{s['uri']} key {rec['key']!r}"
                img = decode_image(rec["image_bytes"], name=name) if latent == "pixel" else None
            except ValueError as err:
                log.warning("skipping undecodable sample: %s", err)
                continue
            cap, syn = record_captions(rec)
            if img is not None and images and img.shape != images[0].shape:
                raise ValueError(
                    f"shard {name}: image is {img.shape[1]}x{img.shape[0]}, the samples before it are "
                    f"{images[0].shape[1]}x{images[0].shape[0]}; training needs one image size"
                )
            orig, srow = table.get(rec["key"], (nan_row, nan_row))
            n_unscored += rec["key"] not in table
            keys.append(rec["key"])
            if img is not None:
                images.append(img)
            caps.append(cap)
            syns.append(syn)
            rows.append(orig)
            syn_rows.append(srow)
    if not keys:
        raise ValueError(f"no usable samples in the shards of {shard_manifest}")
    if reward_names and n_unscored:
        log.warning("%d of %d samples have no scores (rewards absent)", n_unscored, len(keys))
    has_syn = any(s is not None for s in syns)
    data = TrainData(
        keys=keys,
        images=torch.from_numpy(np.stack(images)) if images else None,
        latents=None,
        captions=caps,
        syn_captions=syns if has_syn else None,
        reward_names=list(reward_names),
        rewards=torch.from_numpy(np.stack(rows).astype(np.float32)).reshape(len(keys), len(reward_names)),
        syn_rewards=(
            torch.from_numpy(np.stack(syn_rows).astype(np.float32)).reshape(len(keys), len(reward_names))
            if has_syn
            else None
        ),
    )
    side = None
    if embeds_manifest is not None and text_spec is not None:
        syn_keys = frozenset(k for k, c in zip(keys, syns) if c is not None)
        side = _load_sidecar_text(Path(embeds_manifest), text_spec, shards, keys, storage, syn_keys)
    if side is not None:
        data.text, data.syn_text, data.latents = side[0], side[1], side[2]
    elif text_encoder is not None and not isinstance(text_encoder, torch.nn.Module):
        t = encode_captions(text_encoder, caps)
        data.text = TextArrays(t["tokens"], t["mask"], t["pooled"])
        if has_syn:
            s2 = encode_captions(text_encoder, [s if s is not None else c for c, s in zip(caps, syns)])
            data.syn_text = TextArrays(s2["tokens"], s2["mask"], s2["pooled"])
    if latent == "vae" and data.latents is None:
        raise ValueError("train.latent 'vae' needs latent sidecars: run the embed stage with train.latent=vae first")
    return data
