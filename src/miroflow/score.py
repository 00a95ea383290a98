"""Stages *score* and *bin*: per-shard reward tables, then quantile bins per reward.

Score
-----
:func:`run_score` scores every shard of ``params.data.manifest`` with the rewards of
``params.score`` (built by :func:`miroflow.rewards.load_rewards`: lazily, so an up-to-date table is
skipped without building any model), one table per shard at :func:`score_table_uri`, through the
shard scorer :func:`miroflow.score_engine.score_shard`, and writes the local score manifest. The
table and manifest formats are :mod:`miroflow.data.score_tables`. On a rerun (resume), a table is
only trusted when it matches its hash record ``<stem>.parquet.sha256``; a damaged or truncated one
is rescored (warning naming it).

Table location: ``<root>/scores/<dataset>/<shard-stem>.parquet`` where ``<dataset>`` is the name of
the shard's parent folder (the data hash for shards written by ``prepare``; the data hash of
``params.data`` when a shard sits at the top of a bucket).

Bins (decision on synthetic captions)
-------------------------------------
:func:`run_bin` fits ``score.num_bins`` quantile bins per reward on the *normalised* columns, with the
``r@synthetic`` values pooled into reward ``r``'s sample before the (seeded) ``≤ bin_max_samples``
subsample. One grid per reward means a conditioning value means the same whichever caption the
trainer uses for a sample (the paper's "scores follow the caption actually used" pitfall): the
trainer picks ``r`` or ``r@synthetic`` per sample and maps both through the same edges.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from miroflow.conditioning import BinFitError, BinSet, RewardBins, fit_bins, save_bins
from miroflow.config import Params
from miroflow.content_keys import stage_hash
from miroflow.data.hashing import data_hash
from miroflow.data.score_tables import (
    SYNTHETIC_SUFFIX,
    TABLE_FORMAT,
    ScoreError,
    ScoreInputError,
    failures_uri,
    finite_or_nan,
    load_score_table,
    read_score_manifest,
    write_score_manifest,
)
from miroflow.data.shards import read_manifest
from miroflow.rewards import load_rewards, reward_versions
from miroflow.score_engine import score_shard, shard_stem
from miroflow.score_reuse import record_reward_set, score_shard_incremental
from miroflow.storage import Storage, from_config, join_uri, parse_uri

__all__ = [
    "TABLE_FORMAT",
    "SYNTHETIC_SUFFIX",
    "ScoreError",
    "score_table_uri",
    "failures_uri",
    "score_shard",
    "run_score",
    "run_bin",
]

log = logging.getLogger(__name__)


def _parent_name(shard_uri: str) -> str:
    """Name of the folder holding the shard, or ``""`` at a bucket/filesystem root."""
    p = parse_uri(shard_uri)
    if p.kind == "s3":
        parts = [s for s in p.key.split("/") if s]
        return parts[-2] if len(parts) >= 2 else ""
    return p.path.parent.name


def score_table_uri(params: Params, shard_uri: str) -> str:
    """``<storage.root>/scores/<dataset>/<score-hash>/<shard-stem>.parquet``.

    ``<dataset>`` is the shard's parent folder name (``prepare`` puts shards under
    ``<root>/shards/<data-hash>/``, so this is the data hash), or ``data_hash(params.data)`` for a
    shard at the top of a bucket or filesystem. ``<score-hash>`` is
    :func:`miroflow.content_keys.stage_hash` of ``score`` (the reward set among its inputs), so
    scoring with other rewards never overwrites a table an older manifest names.
    """
    dataset = _parent_name(shard_uri)
    if not dataset or dataset in (".", ".."):
        dataset = data_hash(params.data)
    return join_uri(
        params.storage.root, "scores", dataset, stage_hash(params, "score"), f"{shard_stem(shard_uri)}.parquet"
    )


def run_score(params: Params, storage: Storage | None = None, shard_uris: list[str] | None = None) -> dict[str, Any]:
    """Stage score: score the shards of ``params.data.manifest`` and write ``params.score.manifest``.

    Args:
        params: the whole config (``data.manifest``, ``score.*``, ``storage.root``).
        storage: defaults to ``from_config(params.storage)``.
        shard_uris: a subset of the manifest's shards (default: all of them).

    Returns:
        The score manifest dict (see :func:`write_score_manifest`).
    """
    storage = storage or from_config(params.storage)
    shards = read_manifest(params.data.manifest)["shards"]
    by_uri = {s["uri"]: s for s in shards}
    if shard_uris is not None:
        unknown = [u for u in shard_uris if u not in by_uri]
        if unknown:
            raise ScoreError(f"shard(s) {unknown} are not in the manifest {params.data.manifest}")
        shards = [by_uri[u] for u in shard_uris]
    rewards = load_rewards(params.score)
    entries = []
    for s in tqdm(shards, desc="score shards", unit="shard"):
        entries.append(
            score_shard_incremental(
                s["uri"],
                rewards,
                score_table_uri(params, s["uri"]),
                storage,
                batch_size=params.score.batch_size,
                expected_sha256=s["sha256"],
            )
        )
    done = sum(1 for e in entries if e["skipped"])
    log.info("scored %d shard(s), %d already up to date", len(entries) - done, done)
    versions = reward_versions(rewards)
    for uri in {e["uri"] for e in entries}:
        record_reward_set(storage, uri, versions)
    return write_score_manifest(params.score.manifest, versions, entries)


def run_bin(params: Params, storage: Storage | None = None) -> BinSet:
    """Stage bin: fit quantile bins per reward from the tables in ``params.score.manifest``.

    For each reward ``r`` of the manifest, the normalised values of column ``r`` and (if present)
    ``r@synthetic`` are pooled; NaN values are absent and ignored. ``fit_bins`` then draws at most
    ``score.bin_max_samples`` of them (seed 0) and fits ``score.num_bins`` quantile bins. The result
    is saved to ``params.score.bins`` and copied to ``<root>/bins/bins-<hash>.json``.

    Raises:
        ScoreError: the manifest is missing/stale (other rewards than ``score.rewards``) or a table
            was written for other reward versions than the manifest says.
        ScoreInputError: a table lacks a reward's column or holds ±inf in one (names table and column).
        BinFitError: a reward has no finite values (names it and the manifest).
    """
    storage = storage or from_config(params.storage)
    manifest = read_score_manifest(params.score.manifest)
    stored: dict[str, str] = {str(k): str(v) for k, v in manifest["rewards"].items()}
    if set(stored) != set(params.score.rewards):
        raise ScoreError(
            f"score manifest {params.score.manifest} has rewards {sorted(stored)} but score.rewards is "
            f"{list(params.score.rewards)}; rerun the score stage"
        )
    versions = {name: stored[name] for name in params.score.rewards}  # BinSet columns in params order
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in versions}
    sources: list[str] = []  # what each reward's values are a function of: the shard bytes
    for t in tqdm(manifest["tables"], desc="bin: read tables", unit="table"):
        df = load_score_table(t["uri"], storage)
        sources.append(str(df.attrs["miroflow"].get("shard_sha256") or t["uri"]))
        if df.attrs["miroflow"].get("rewards") != versions:
            raise ScoreError(
                f"score table {t['uri']} has rewards {df.attrs['miroflow'].get('rewards')}, "
                f"the manifest says {versions}; rerun the score stage"
            )
        for name in versions:
            if name not in df.columns:
                raise ScoreInputError(f"score table {t['uri']} has no column {name!r}")
            for col in (name, f"{name}{SYNTHETIC_SUFFIX}"):
                if col in df.columns:
                    pooled[name].append(finite_or_nan(df, col, t["uri"]))
    values = {name: (np.concatenate(cols) if cols else np.zeros(0)) for name, cols in pooled.items()}
    fitted: dict[str, RewardBins] = {}
    reused: list[str] = []
    for name, vals in values.items():
        fp = hashlib.sha256(
            json.dumps(
                [name, versions[name], params.score.num_bins, params.score.bin_max_samples, sorted(sources)]
            ).encode()
        ).hexdigest()[:16]
        cache = join_uri(params.storage.root, "bins", "reward", f"{name}-{fp}.json")
        if storage.exists(cache):  # same reward version on the same shards: the same edges
            fitted[name] = BinSet.from_json(json.loads(storage.read_bytes(cache))).rewards[name]
            reused.append(name)
            continue
        try:
            one = fit_bins(
                {name: vals},
                num_bins=params.score.num_bins,
                max_samples=params.score.bin_max_samples,
                versions={name: versions[name]},
            )
        except BinFitError as err:  # e.g. a reward that is NaN (absent) in every table
            raise BinFitError(f"score manifest {params.score.manifest}: {err}") from None
        storage.write_bytes(cache, (json.dumps(one.to_json(), allow_nan=False) + "\n").encode("utf-8"))
        fitted[name] = one.rewards[name]
    binset = BinSet(num_bins=params.score.num_bins, rewards=fitted)
    log.info(
        "bins: fitted %s; reused %s (unchanged inputs)",
        [n for n in fitted if n not in reused] or "none",
        reused or "none",
    )
    save_bins(binset, params.score.bins)
    text = json.dumps(binset.to_json(), indent=2, allow_nan=False) + "\n"
    storage.write_bytes(join_uri(params.storage.root, "bins", f"bins-{binset.hash}.json"), text.encode("utf-8"))
    return binset
