"""Content hash of the data params: names the folders that hold one dataset's shards, scores and sidecars."""

from __future__ import annotations

import hashlib
import json

from miroflow.config import DataConfig

__all__ = ["data_hash"]


def data_hash(cfg: DataConfig) -> str:
    """Short content hash of the data params that change shard bytes (12 hex chars).

    Every field of ``cfg`` except ``manifest`` (where the local manifest lives) goes into it, so two
    configs that would render or import different shards never share a folder. ``min_side`` (added
    later, import only) enters only when set, so the datasets made before it keep their hash.
    """
    fields = cfg.model_dump(mode="json", exclude={"manifest"} | ({"min_side"} if cfg.min_side is None else set()))
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
