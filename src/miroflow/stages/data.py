"""Stage entry points of the data path: prepare, score (whole dataset or one shard), bin, embed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from miroflow.config import Params, ScoreConfig, StorageConfig
from miroflow.data.score_tables import write_score_manifest
from miroflow.embed import embeds_manifest_path, run_embed
from miroflow.preflight import preflight
from miroflow.prepare import run_prepare
from miroflow.results import BinResult, EmbedResult, PrepareResult, ScoreResult, ShardRef, ShardScore
from miroflow.rewards import load_rewards
from miroflow.score import run_bin, run_score
from miroflow.score_reuse import record_reward_set, score_shard_incremental
from miroflow.storage import Storage, from_config

__all__ = ["prepare", "score", "score_one_shard", "write_scores", "bin_scores", "embed"]


def prepare(params: Params, storage: Storage | None = None) -> PrepareResult:
    """Render (shapes) or import (cc12m-style tars) the dataset into shards; writes ``data.manifest``."""
    preflight(params, "prepare", storage)
    m = run_prepare(params, storage)
    return PrepareResult(
        manifest=str(params.data.manifest),
        root=str(m["root"]),
        data_hash=str(m["data_hash"]),
        domain=str(m["domain"]),
        num_samples=int(m["num_samples"]),
        shards=tuple(ShardRef(uri=s["uri"], sha256=s["sha256"], n=int(s["n"])) for s in m["shards"]),
        rejected=tuple(m.get("rejected", ())),
    )


def score(params: Params, storage: Storage | None = None, shard_uris: Sequence[str] | None = None) -> ScoreResult:
    """Score every shard (or ``shard_uris``) with ``score.rewards``; writes ``score.manifest``. Resumable."""
    preflight(params, "score", storage)
    m = run_score(params, storage, list(shard_uris) if shard_uris is not None else None)
    return score_result(params, m)


def score_result(params: Params, manifest: Mapping[str, object]) -> ScoreResult:
    """The :class:`ScoreResult` of a score manifest document."""
    tables = manifest["tables"]
    assert isinstance(tables, list)
    rewards = manifest["rewards"]
    assert isinstance(rewards, dict)
    return ScoreResult(
        manifest=str(params.score.manifest),
        rewards={str(k): str(v) for k, v in rewards.items()},
        num_tables=len(tables),
        num_rows=int(str(manifest["num_rows"])),
        failures=sum(int(t.get("failures", 0)) for t in tables),
    )


def score_one_shard(
    shard_uri: str, out_uri: str, expected_sha256: str | None, score_cfg: ScoreConfig, storage_cfg: StorageConfig
) -> ShardScore:
    """Score one shard into its table (skipped when already up to date for these reward versions);
    the unit of work of the score flow's parallel tasks. Writes no manifest (see :func:`write_scores`)."""
    r = score_shard_incremental(
        shard_uri,
        load_rewards(score_cfg),
        out_uri,
        from_config(storage_cfg),
        batch_size=score_cfg.batch_size,
        progress=False,
        expected_sha256=expected_sha256,
    )
    return ShardScore.from_dict(r)


def write_scores(params: Params, shards: Sequence[ShardScore]) -> ScoreResult:
    """Write ``score.manifest`` from per-shard results (:func:`score_one_shard`)."""
    versions = {r.name: r.version for r in load_rewards(params.score)}
    storage = from_config(params.storage)
    for uri in {s.uri for s in shards}:
        record_reward_set(storage, uri, versions)
    m = write_score_manifest(params.score.manifest, versions, [s.to_dict() for s in shards])
    return score_result(params, m)


def bin_scores(params: Params, storage: Storage | None = None) -> BinResult:
    """Fit ``score.num_bins`` quantile bins per reward; writes ``score.bins`` (+ a copy in storage)."""
    preflight(params, "bin", storage)
    b = run_bin(params, storage)
    return BinResult(
        path=str(params.score.bins),
        hash=b.hash,
        names=tuple(b.names),
        num_bins=int(b.num_bins),
        counts={n: int(rb.n) for n, rb in b.rewards.items()},
    )


def embed(params: Params, storage: Storage | None = None) -> EmbedResult:
    """Text-embedding (and VAE-latent) sidecars per shard; writes ``embeds.json`` next to ``data.manifest``."""
    preflight(params, "embed", storage)
    m = run_embed(params, storage)
    return EmbedResult(
        manifest=str(embeds_manifest_path(params)), sidecars=len(m["sidecars"]), encoder=str(m["encoder"])
    )
