"""Streaming training data: each rank reads only its partitions' shards, one shuffle window at a time.

The order is :class:`~miroflow.data.stream_plan.StreamPlan`'s (docs/architecture.md, "Streaming").
A window's shards are read through :class:`~miroflow.storage.Storage` (local files, or S3 with the
resuming reader), joined with their score-table rows (bin-mapped like the in-memory path) and
their embedding sidecars (or encoded with the frozen text encoder when there are none), and
permuted into the plan's order. Loader threads (``train.stream_workers``) read the *next* window
of each partition while the current one is consumed, so memory holds at most two windows per
partition of the rank: ``2 × partitions/world × stream_window`` shards, whatever the dataset size.
Sidecars are safetensors; score tables parquet; tar members are never unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from miroflow.conditioning import BinSet
from miroflow.data.score_tables import load_score_table
from miroflow.data.shards import decode_image, iter_shard
from miroflow.data.sidecars import encode_captions, read_sidecar, record_captions
from miroflow.data.stream_plan import StreamPlan, Window
from miroflow.data.train_data import (
    Batch,
    TextArrays,
    TrainData,
    check_reward_inputs,
    score_manifest_tables,
    table_rows,
)
from miroflow.errors import InputError
from miroflow.storage import Storage

__all__ = ["StreamError", "ShardLoader", "StreamSource", "concat_rows", "scan_captions", "take_rows"]

log = logging.getLogger(__name__)


class StreamError(InputError, ValueError):
    """A shard cannot be streamed as planned (its samples do not match the manifest); names the shard."""


# ------------------------------------------------------------------ rows of a TrainData


def take_rows(d: TrainData, idx: Tensor) -> TrainData:
    """Rows ``idx [n]`` of ``d`` as a new :class:`TrainData` (same fields, same meaning)."""
    ids = idx.long().tolist()

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[idx]

    def text(t: TextArrays | None) -> TextArrays | None:
        return None if t is None else t.select(idx)

    return TrainData(
        keys=[d.keys[i] for i in ids],
        images=rows(d.images),
        latents=rows(d.latents),
        captions=[d.captions[i] for i in ids],
        syn_captions=None if d.syn_captions is None else [d.syn_captions[i] for i in ids],
        reward_names=list(d.reward_names),
        rewards=d.rewards[idx],
        syn_rewards=rows(d.syn_rewards),
        text=text(d.text),
        syn_text=text(d.syn_text),
    )


def _cat(ts: list[Tensor | None]) -> Tensor | None:
    return None if any(t is None for t in ts) else torch.cat([t for t in ts if t is not None])


def _cat_text(ts: list[TextArrays | None]) -> TextArrays | None:
    if any(t is None for t in ts):
        return None
    parts = [t for t in ts if t is not None]
    return TextArrays(*(torch.cat([getattr(t, f) for t in parts]) for f in ("tokens", "mask", "pooled")))


def concat_rows(parts: Sequence[TrainData]) -> TrainData:
    """The rows of ``parts`` one after the other (a part without synthetic captions gets ``None`` rows,
    its originals as synthetic rewards/text: :meth:`TrainData.batch` never picks them)."""
    if not parts:
        raise ValueError("concat_rows: nothing to concatenate")
    any_syn = any(p.syn_captions is not None for p in parts)
    syn_caps: list[str | None] | None = None
    if any_syn:
        syn_caps = [c for p in parts for c in (p.syn_captions or [None] * len(p))]
    syn_text = (
        _cat_text([p.syn_text if p.syn_captions is not None else p.text for p in parts])
        if any_syn and any(p.syn_text is not None for p in parts)
        else None
    )
    return TrainData(
        keys=[k for p in parts for k in p.keys],
        images=_cat([p.images for p in parts]),
        latents=_cat([p.latents for p in parts]),
        captions=[c for p in parts for c in p.captions],
        syn_captions=syn_caps,
        reward_names=list(parts[0].reward_names),
        rewards=torch.cat([p.rewards for p in parts]),
        syn_rewards=(
            torch.cat([p.syn_rewards if p.syn_rewards is not None else p.rewards for p in parts]) if any_syn else None
        ),
        text=_cat_text([p.text for p in parts]),
        syn_text=syn_text,
    )


# ------------------------------------------------------------------ one shard


@dataclass
class ShardLoader:
    """Reads one shard's training rows (images or latents, captions, conditioning, text).

    Attributes:
        storage: where shards, tables and sidecars live.
        reward_names: trained rewards (column order); ``[]`` = baseline.
        binset: bins of every reward in ``reward_names`` (None for a baseline).
        tables: shard URI -> score-table URI (from the score manifest).
        sidecars: shard URI -> embedding-sidecar URI, when the embed stage wrote them for this encoder.
        text_encoder: frozen encoder used when a shard has no sidecar (None: the learned encoder).
        latent: ``"pixel"`` (decoded ``uint8 [n, H, W, 3]``) or ``"vae"`` (sidecar latents).
        resolution: the image side every sample must have (pixel).
    """

    storage: Storage
    reward_names: list[str]
    binset: BinSet | None
    tables: dict[str, str]
    sidecars: dict[str, str]
    text_encoder: Any | None
    latent: str
    resolution: int

    @classmethod
    def from_manifests(
        cls,
        storage: Storage,
        reward_names: list[str],
        binset: BinSet | None,
        score_manifest: str | Path | None,
        embeds_manifest: str | Path | None,
        text_spec: str | None,
        text_encoder: Any | None,
        latent: str,
        resolution: int,
    ) -> ShardLoader:
        """Index the score tables and matching sidecars of the run's manifests (metadata only)."""
        check_reward_inputs(reward_names, binset, score_manifest, "stream")
        tables: dict[str, str] = {}
        if reward_names:
            assert score_manifest is not None
            tables = {str(t["shard"]): str(t["uri"]) for t in score_manifest_tables(score_manifest)}
        sidecars: dict[str, str] = {}
        if embeds_manifest is not None and text_spec is not None and Path(embeds_manifest).is_file():
            em = json.loads(Path(embeds_manifest).read_text(encoding="utf-8"))
            if em.get("encoder") == text_spec:
                sidecars = {str(e["shard"]): str(e["uri"]) for e in em.get("sidecars", [])}
        if latent == "vae" and not sidecars:
            raise ValueError("train.latent=vae streams latents from the embed stage's sidecars: run `miroflow embed`")
        return cls(storage, list(reward_names), binset, tables, sidecars, text_encoder, latent, resolution)

    def _scores(self, shard_uri: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        table = self.tables.get(shard_uri)
        if not self.reward_names:
            return {}
        if table is None:
            log.warning("shard %s has no score table; its rewards are absent (NaN)", shard_uri)
            return {}
        assert self.binset is not None
        return table_rows(load_score_table(table, self.storage), self.reward_names, self.binset, table)

    def load(self, shard_uri: str, expected: int) -> TrainData:
        """Every sample of ``shard_uri`` in shard order; exactly ``expected`` (the manifest's ``n``).

        Raises:
            StreamError: an undecodable or wrongly sized sample, or a count other than ``expected``.
        """
        scores = self._scores(shard_uri)
        nan_row = np.full(len(self.reward_names), np.nan)
        keys: list[str] = []
        images: list[np.ndarray] = []
        caps: list[str] = []
        syns: list[str | None] = []
        rows: list[np.ndarray] = []
        syn_rows: list[np.ndarray] = []
        for rec in iter_shard(shard_uri, self.storage):
            name = f"shard {shard_uri} key {rec['key']!r}"
            if self.latent == "pixel":
                try:
                    img = decode_image(rec["image_bytes"], name=name)
                except ValueError as err:
                    raise StreamError(f"{err}; the stream order needs every sample (use train.data=memory)") from err
                if img.shape[:2] != (self.resolution, self.resolution):
                    raise StreamError(
                        f"{name}: image is {img.shape[1]}x{img.shape[0]}, data.resolution is {self.resolution}"
                    )
                images.append(img)
            cap, syn = record_captions(rec)
            orig, srow = scores.get(rec["key"], (nan_row, nan_row))
            keys.append(str(rec["key"]))
            caps.append(cap)
            syns.append(syn)
            rows.append(orig)
            syn_rows.append(srow)
        if len(keys) != expected:
            raise StreamError(f"shard {shard_uri}: the manifest says {expected} samples, it holds {len(keys)}")
        has_syn = any(s is not None for s in syns)
        r = len(self.reward_names)
        data = TrainData(
            keys=keys,
            images=torch.from_numpy(np.stack(images)) if images else None,
            latents=None,
            captions=caps,
            syn_captions=syns if has_syn else None,
            reward_names=list(self.reward_names),
            rewards=torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(len(keys), r)),
            syn_rewards=torch.from_numpy(np.asarray(syn_rows, dtype=np.float32).reshape(len(keys), r))
            if has_syn
            else None,
        )
        self._attach_text(data, shard_uri)
        return data

    def _attach_text(self, data: TrainData, shard_uri: str) -> None:
        side = self.sidecars.get(shard_uri)
        if side is not None:
            tensors, meta = read_sidecar(side, self.storage)
            pos = {str(k): i for i, k in enumerate(json.loads(meta["keys"]))}
            missing = [k for k in data.keys if k not in pos]
            if missing:
                raise StreamError(f"embedding sidecar {side} lacks key(s) {missing[:5]}; rerun the embed stage")
            idx = torch.tensor([pos[k] for k in data.keys], dtype=torch.long)
            data.text = TextArrays(tensors["tokens"][idx], tensors["mask"][idx], tensors["pooled"][idx])
            if "syn_tokens" in tensors:
                data.syn_text = TextArrays(
                    tensors["syn_tokens"][idx], tensors["syn_mask"][idx], tensors["syn_pooled"][idx]
                )
            elif data.syn_captions is not None:
                raise StreamError(
                    f"embedding sidecar {side} has no synthetic-caption embeddings; rerun the embed stage"
                )
            if self.latent == "vae":  # the posterior [n, 2, C, h, w] (mean, std), either sidecar layout
                from miroflow.data.sidecars import posterior_latents

                post = posterior_latents(tensors)
                if post is None:
                    raise StreamError(f"embedding sidecar {side} has no VAE latents; rerun the embed stage")
                data.latents = post[idx]
            return
        if self.latent == "vae":
            raise StreamError(f"shard {shard_uri} has no embedding sidecar with latents; rerun the embed stage")
        if self.text_encoder is not None and not isinstance(self.text_encoder, torch.nn.Module):
            t = encode_captions(self.text_encoder, data.captions)
            data.text = TextArrays(t["tokens"], t["mask"], t["pooled"])
            if data.syn_captions is not None:
                s = encode_captions(self.text_encoder, [c or o for c, o in zip(data.syn_captions, data.captions)])
                data.syn_text = TextArrays(s["tokens"], s["mask"], s["pooled"])


def scan_captions(shard_uris: Sequence[str], storage: Storage) -> list[str]:
    """Every original and synthetic caption of the shards, in order (the ``learned`` encoder's
    vocabulary is built from them; one pass over the shards, images not decoded)."""
    out: list[str] = []
    for uri in shard_uris:
        for rec in iter_shard(uri, storage):
            cap, syn = record_captions(rec)
            out.append(cap)
            if syn:
                out.append(syn)
    return out


# ------------------------------------------------------------------ a rank's stream


@dataclass
class _Cursor:
    """Where one partition's stream stands: its current window's rows and the prefetched next window."""

    window: Window | None = None
    rows: TrainData | None = None
    pending: Future[tuple[Window, TrainData]] | None = None


class StreamSource:
    """This rank's rows of every global batch, read from its partitions' shards.

    Args:
        plan: the sample order.
        shard_uris: the manifest's shard URIs (plan shard index -> URI).
        loader: reads one shard's rows.
        rank, world: this process and the world size (``world`` divides the plan's partitions).
        workers: loader threads reading ahead (0: read each window when it is first needed).
    """

    def __init__(
        self, plan: StreamPlan, shard_uris: Sequence[str], loader: ShardLoader, rank: int, world: int, workers: int
    ) -> None:
        self.plan, self.uris, self.loader = plan, list(shard_uris), loader
        self.partitions = list(plan.rank_partitions(rank, world))
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="miroflow-stream") if workers > 0 else None
        )
        self._cursors = {c: _Cursor() for c in self.partitions}
        self.windows_read = 0

    def __len__(self) -> int:
        """Samples per epoch over all partitions (the dataset size)."""
        return int(self.plan.sizes.sum())

    def close(self) -> None:
        """Stop the loader threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, partition: int, w: Window) -> tuple[Window, TrainData]:
        parts = [self.loader.load(self.uris[s], int(self.plan.sizes[s])) for s in w.shards]
        self.windows_read += 1
        return w, take_rows(concat_rows(parts), torch.from_numpy(w.order))

    def _prefetch(self, partition: int, cur: _Cursor) -> None:
        assert cur.window is not None
        nxt = self.plan.next_window(partition, cur.window)
        if self._pool is not None:
            cur.pending = self._pool.submit(self._read, partition, nxt)

    def _enter(self, partition: int, cur: _Cursor, w: Window) -> None:
        """Make ``w`` the current window (from the prefetch when it is that one)."""
        if cur.pending is not None and cur.pending.result()[0].start == w.start:
            cur.window, cur.rows = cur.pending.result()
        else:
            cur.window, cur.rows = self._read(partition, w)
        cur.pending = None
        self._prefetch(partition, cur)

    def _chunk(self, partition: int, start: int, count: int) -> TrainData:
        """Positions ``[start, start+count)`` of ``partition``'s sequence."""
        cur = self._cursors[partition]
        out: list[TrainData] = []
        pos = start
        while pos < start + count:
            w = cur.window
            if w is None or not w.start <= pos < w.start + w.size:
                target = self.plan.window_at(partition, pos)[0]
                self._enter(partition, cur, target)
                w = cur.window
            assert w is not None and cur.rows is not None
            hi = min(start + count, w.start + w.size)
            out.append(take_rows(cur.rows, torch.arange(pos - w.start, hi - w.start)))
            pos = hi
        return out[0] if len(out) == 1 else concat_rows(out)

    def rows(self, step: int) -> TrainData:
        """This rank's rows of global step ``step`` (``B / world`` samples, partition-major)."""
        start, b = self.plan.chunk_start(step), self.plan.per_partition
        return concat_rows([self._chunk(c, start, b) for c in self.partitions])

    def batch(self, step: int, rows: slice, use_syn: Tensor | None = None) -> Batch:
        """This rank's :class:`Batch` of global step ``step``; ``rows`` must be this rank's rows of the
        global batch (:func:`~miroflow.data.train_data.rank_slice`); ``use_syn [B/world]`` as in
        :meth:`TrainData.batch`."""
        d = self.rows(step)
        first = self.partitions[0] * self.plan.per_partition
        if (rows.start, rows.stop) != (first, first + len(d)):
            raise ValueError(f"stream: rows {rows} are not this rank's rows [{first}, {first + len(d)})")
        return d.batch(torch.arange(len(d)), use_syn)

    def describe(self) -> dict[str, int]:
        """The settings the sample order depends on (recorded in checkpoints, checked on resume)."""
        p = self.plan
        return {"partitions": p.partitions, "window": p.window_shards, "seed": p.seed, "batch_size": p.batch_size}
