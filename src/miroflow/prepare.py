"""Stage prepare: render (shapes) or import (cc12m-style tars) into webdataset shards.

Outputs go to ``<storage.root>/shards/<data-hash>/{split}-{i:06d}.tar`` so datasets made with
different params never overwrite each other, plus the local manifest ``data.manifest``.
Resumable: a shard that already exists under the same data hash is not rendered again.
An import brings every image to ``data.resolution`` (centre crop, Lanczos resize, RGB, lossless
re-encode; :mod:`miroflow.data.importers`) and records what it did under the manifest's
``preprocess`` key; images below ``data.min_side`` are listed under ``rejected``
(docs/architecture.md, "Imported data").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from miroflow.config import Params
from miroflow.data.hashing import data_hash
from miroflow.data.importers import RESIZE_REDUCING_GAP, import_tars
from miroflow.data.shapes import iter_samples
from miroflow.data.shards import write_manifest, write_shard
from miroflow.storage import Storage, from_config, join_uri, sha256_bytes

__all__ = ["shards_prefix", "run_prepare"]

log = logging.getLogger(__name__)


def shards_prefix(params: Params) -> str:
    """URI prefix that holds this dataset's shards."""
    return join_uri(params.storage.root, "shards", data_hash(params.data))


def _render_shapes(params: Params, storage: Storage, prefix: str) -> list[dict[str, Any]]:
    """Render ``data.num_samples`` shapes samples into shards under ``prefix`` (existing shards are kept)."""
    cfg = params.data
    n_shards = -(-cfg.num_samples // cfg.shard_size)
    entries: list[dict[str, Any]] = []
    for i in tqdm(range(n_shards), desc="prepare shards", unit="shard"):
        start = i * cfg.shard_size
        stop = min(cfg.num_samples, start + cfg.shard_size)
        uri = join_uri(prefix, f"{cfg.split}-{i:06d}.tar")
        if storage.exists(uri):
            data = storage.read_bytes(uri)
            entries.append({"uri": uri, "sha256": sha256_bytes(data), "n": stop - start})
            continue
        samples = list(iter_samples(cfg, start=start, stop=stop))
        entries.append(write_shard(samples, uri, storage, cfg.image_format))
    return entries


def run_prepare(params: Params, storage: Storage | None = None) -> dict[str, Any]:
    """Run the prepare stage and write the local manifest.

    Returns:
        The manifest dict (``root``, ``shards`` [{uri, sha256, n}], ``num_samples``, ...).
    """
    storage = storage or from_config(params.storage)
    prefix = shards_prefix(params)
    cfg = params.data
    extra: dict[str, Any] = {"data_hash": data_hash(cfg), "domain": cfg.domain, "split": cfg.split}
    if cfg.domain == "shapes":
        entries = _render_shapes(params, storage, prefix)
    else:
        if not cfg.import_uri:
            raise ValueError("data.import_uri: required when data.domain is 'import'")
        report = import_tars(
            cfg.import_uri,
            prefix,
            split=cfg.split,
            shard_size=cfg.shard_size,
            storage=storage,
            max_pixels=cfg.max_pixels,
            resolution=cfg.resolution,
            min_side=cfg.min_side,
            image_format=cfg.image_format,
        )
        entries = report.entries
        extra["rejected"] = report.rejected
        extra["preprocess"] = {
            "resolution": cfg.resolution,
            "crop": "center-square",
            "filter": "lanczos",
            "reducing_gap": RESIZE_REDUCING_GAP,
            "mode": "RGB",
            "image_format": cfg.image_format,
            "min_side": cfg.min_side,
        }
        for r in report.rejected:
            log.warning("import rejected %s", r)
    Path(cfg.manifest).parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(cfg.manifest, entries, root=prefix, extra=extra)
