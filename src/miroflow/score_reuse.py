"""Incremental scoring: build a shard's table for a reward set from tables that already hold some of it.

Score tables live at ``<root>/scores/<dataset>/<set-hash>/<stem>.parquet``, one folder per reward set
(:func:`miroflow.score.score_table_uri`). Each dataset folder keeps a small registry,
``<root>/scores/<dataset>/reward_sets.json`` = ``{set-hash: {reward: version}}``, of the sets scored
into it. When a shard's table for the wanted set is missing, :func:`score_shard_incremental` looks
for *donor* tables of the same shard bytes (``shard_sha256``) in the other registered folders:

* every wanted reward whose ``name`` *and* ``version`` a donor holds is copied from it (0 reward
  calls; columns ``r.raw``, ``r``, ``r@synthetic.raw``, ``r@synthetic``);
* only the rest is scored, through the ordinary shard scorer, into
  ``<set folder>/parts/<stem>.parquet`` (itself a checked, resumable table);
* the wanted table is assembled from the two, in the reward order asked for.

So adding a reward computes only its column, removing one computes nothing, and bumping one
reward's version rescores that reward alone. Donors are trusted only when intact (their hash
record matches) and when every source has the same sample keys in the same order; anything else
falls back to scoring the whole set. See docs/architecture.md ("Score tables").
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from miroflow.data.score_tables import (
    SYNTHETIC_SUFFIX,
    TABLE_FORMAT,
    check_score_table,
    failures_uri,
    load_score_table,
    table_bytes,
    table_hash_record,
    table_hash_uri,
)
from miroflow.rewards import reward_versions
from miroflow.score_engine import score_shard, shard_stem, skipped_result
from miroflow.storage import NotFoundError, Storage, join_uri, parse_uri, sha256_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from miroflow.rewards.base import Reward

__all__ = ["REGISTRY_NAME", "reward_columns", "reward_sets", "record_reward_set", "score_shard_incremental"]

log = logging.getLogger(__name__)

#: Registry of the reward sets scored into one dataset folder.
REGISTRY_NAME = "reward_sets.json"


def _parent(uri: str) -> str:
    """``uri`` without its last path component (local path or ``s3://``)."""
    p = parse_uri(uri)
    if p.kind == "s3":
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(p.path.parent)


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def reward_columns(name: str) -> tuple[str, ...]:
    """The table columns that belong to reward ``name`` (present or not in a given table)."""
    syn = f"{name}{SYNTHETIC_SUFFIX}"
    return (f"{name}.raw", name, f"{syn}.raw", syn)


def reward_sets(storage: Storage, dataset_folder: str) -> dict[str, dict[str, str]]:
    """``{set-hash: {reward: version}}`` registered under ``dataset_folder`` (empty when none or unreadable)."""
    uri = join_uri(dataset_folder, REGISTRY_NAME)
    try:
        doc = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except NotFoundError:
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("reward-set registry %s is unreadable (%s); no table reuse this time", uri, err)
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(h): {str(k): str(v) for k, v in s.items()} for h, s in doc.items() if isinstance(s, dict)}


def record_reward_set(storage: Storage, table_uri: str, versions: dict[str, str]) -> None:
    """Register the reward set of ``table_uri``'s folder (``{reward: version}``) in its dataset's registry."""
    set_folder = _parent(table_uri)
    dataset = _parent(set_folder)
    sets = reward_sets(storage, dataset)
    key = _name(set_folder)
    if sets.get(key) == versions:
        return
    sets[key] = dict(versions)
    text = json.dumps(sets, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(join_uri(dataset, REGISTRY_NAME), text.encode("utf-8"))


def _donors(
    out_uri: str, versions: dict[str, str], expected_sha256: str | None, storage: Storage
) -> tuple[dict[str, str], dict[str, pd.DataFrame]]:
    """``({reward: donor uri}, {donor uri: table})`` for the wanted rewards other tables hold."""
    set_folder = _parent(out_uri)
    dataset = _parent(set_folder)
    stem = _name(out_uri)
    by_reward: dict[str, str] = {}
    tables: dict[str, pd.DataFrame] = {}
    for h, held in sorted(reward_sets(storage, dataset).items()):
        uri = join_uri(dataset, h, stem)
        if uri == out_uri:
            continue
        wanted = [n for n, v in versions.items() if held.get(n) == v and n not in by_reward]
        if not wanted:
            continue
        check = check_score_table(uri, storage)
        if check.meta is None or check.problem is not None:
            continue
        if expected_sha256 is not None and check.meta.get("shard_sha256") != expected_sha256:
            continue
        df = load_score_table(uri, storage)
        have = {n for n, v in check.meta.get("rewards", {}).items() if versions.get(n) == v and n in df.columns}
        for n in wanted:
            if n in have:
                by_reward[n] = uri
                tables[uri] = df
    return by_reward, tables


def score_shard_incremental(
    shard_uri: str,
    rewards: list[Reward],
    out_uri: str,
    storage: Storage,
    batch_size: int = 64,
    progress: bool = True,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """:func:`miroflow.score_engine.score_shard`, reusing other reward sets' tables of the same shard.

    Returns the same dict as ``score_shard`` plus ``"reused"`` (rewards copied from donor tables)
    and ``"scored"`` (rewards computed now; empty for a skipped or fully reused table).
    """
    versions = reward_versions(rewards)
    current = check_score_table(out_uri, storage)
    up_to_date = (
        current.meta is not None
        and current.meta.get("rewards") == versions
        and (expected_sha256 is None or current.meta.get("shard_sha256") == expected_sha256)
    )
    if up_to_date:  # the table is already checked: do not read it a second time in score_shard
        return {**skipped_result(shard_uri, out_uri, current), "reused": [], "scored": []}
    donors, tables = _donors(out_uri, versions, expected_sha256, storage)
    if not donors:
        res = score_shard(shard_uri, rewards, out_uri, storage, batch_size, progress, expected_sha256)
        return {**res, "reused": [], "scored": [] if res["skipped"] else list(versions)}
    missing = [r for r in rewards if r.name not in donors]
    sources: dict[str, pd.DataFrame] = {n: tables[u] for n, u in donors.items()}
    fail_src = next(iter(donors.values()))
    if missing:
        part = join_uri(_parent(out_uri), "parts", _name(out_uri))
        score_shard(shard_uri, missing, part, storage, batch_size, progress, expected_sha256)
        fresh = load_score_table(part, storage)
        sources.update({r.name: fresh for r in missing})
        fail_src = part
    keys = [np.asarray(df["key"]) for df in sources.values()]
    if any(len(k) != len(keys[0]) or not np.array_equal(k, keys[0]) for k in keys[1:]):
        log.warning("shard %s: donor tables disagree on their samples; scoring every reward", shard_uri)
        full = score_shard(shard_uri, rewards, out_uri, storage, batch_size, progress, expected_sha256)
        return {**full, "reused": [], "scored": list(versions)}
    columns: dict[str, np.ndarray] = {"key": keys[0].astype(object)}
    for r in rewards:
        df = sources[r.name]
        for col in reward_columns(r.name):
            if col in df.columns:
                columns[col] = df[col].to_numpy(dtype=np.float64)
    metas = [df.attrs["miroflow"] for df in sources.values()]
    meta = {
        "format": TABLE_FORMAT,
        "rewards": versions,
        "shard": shard_uri,
        "shard_sha256": metas[0].get("shard_sha256"),
        "n": len(keys[0]),
        "failures": int(metas[0].get("failures", 0)),
        "synthetic": any(bool(m.get("synthetic")) for m in metas),
    }
    storage.write_bytes(failures_uri(out_uri), storage.read_bytes(failures_uri(fail_src)))
    data = table_bytes(columns, meta)
    storage.write_bytes(table_hash_uri(out_uri), table_hash_record(data, out_uri))
    storage.write_bytes(out_uri, data)  # last: the table is the commit marker
    reused = sorted(donors)
    log.info(
        "shard %s: %s copied from other reward sets, %s scored -> %s",
        shard_stem(shard_uri),
        ", ".join(reused),
        ", ".join(r.name for r in missing) or "nothing",
        out_uri,
    )
    return {
        "shard": shard_uri,
        "uri": out_uri,
        "n": meta["n"],
        "failures": meta["failures"],
        "failures_uri": failures_uri(out_uri),
        "sha256": sha256_bytes(data),
        "skipped": False,
        "reused": reused,
        "scored": [r.name for r in missing],
    }
