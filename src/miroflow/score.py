"""Stages *score* and *bin*: per-shard reward tables, then quantile bins per reward.

Score tables (docs/architecture.md, "Score tables")
---------------------------------------------------
One parquet file per shard, ``<root>/scores/<dataset>/<shard-stem>.parquet`` where ``<dataset>`` is
the name of the shard's parent folder (the data hash for shards written by ``prepare``; the data
hash of ``params.data`` when a shard sits at the top of a bucket). Columns, in order::

    key                                  str
    for each reward r (params order):
        r.raw            float64   raw reward value (NaN = absent / failed)
        r                float64   r.normalize(raw), ≈ [0, 1]; NaN stays NaN
        r@synthetic.raw  float64   only for prompt-dependent rewards, only when the shard's
        r@synthetic      float64   samples carry ``json["captions"]["synthetic"]``

Schema metadata key ``miroflow`` holds JSON ``{"rewards": {name: version}, "shard": uri,
"shard_sha256": hex, "n": rows, "failures": count, "synthetic": bool, "format": 1}``.

Engine
------
The shard is streamed once (its sha256 is computed on the way). Each image is decoded exactly once
(``uint8 [H, W, 3]`` → float ``[B, 3, H, W]`` / 255, batched by identical size) and every reward
runs on that one batch. Reading the tar and decoding run in a background thread (bounded queue) so
they overlap reward compute. Image-only rewards (``uses_prompt`` False) run once per batch even when two
captions exist; prompt-dependent rewards run with the ``.txt`` caption and, for the samples that
have one, with the synthetic caption.

Failures (decision): a sample whose image cannot be decoded, whose ``.txt`` caption is missing or
empty, or that the shard reader rejects (unsafe member, bad JSON, ...) is **not in the table**; it
is listed in ``<stem>.failures.jsonl`` as ``{"key", "reason", "scope": "sample"}`` (a member-level
rejection without a key carries ``"member"`` and ``"key": null``). Keeping such keys out of the table
means the table holds only samples a trainer can use; the failures file is the audit trail. A
sample whose ``json["captions"]`` exists but has no usable synthetic caption stays in the table with
NaN ``@synthetic`` columns and gets a failure line with ``"scope": "synthetic"``. These never stop
the run. A reward that *raises* on a batch is a real error: :class:`ScoreError` names the reward,
the shard and the batch's first/last key, chained to the original exception.

Idempotence and atomicity: the failures file and then the table are written through
:class:`~miroflow.storage.Storage` (temp file + rename locally, one PUT on S3), so a half-written
table is never visible; the table is the commit marker. A shard whose table exists with the same
reward names and versions (read from the parquet metadata; and the same shard sha256 when the
caller knows it) is skipped without building or calling any reward model.

Lazy rewards: :func:`load_rewards` returns :class:`LazyReward` objects. A reward's ``version`` is read
from its class when its factory's return annotation names a class that defines ``version`` as a
class attribute and whose ``__init__`` takes no ``version`` argument (the weight-free rewards and the
shapes judge); otherwise the reward is built once to read it (model rewards: their version names the
checkpoint). Built rewards are cached per process (one model per thread pool / Dask worker).

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
import inspect
import io
import json
import logging
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from miroflow.config import Params, ScoreConfig
from miroflow.conditioning import BinSet, fit_bins, save_bins
from miroflow.data.shards import decode_image, group_to_record, iter_tar_groups, read_manifest
from miroflow.rewards import Reward, RewardNotFound, available_rewards
from miroflow.storage import Storage, from_config, join_uri, parse_uri, sha256_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "TABLE_FORMAT",
    "SYNTHETIC_SUFFIX",
    "ScoreError",
    "LazyReward",
    "score_table_uri",
    "failures_uri",
    "load_rewards",
    "clear_reward_cache",
    "score_shard",
    "run_score",
    "run_bin",
    "load_score_table",
    "read_table_meta",
    "write_score_manifest",
    "read_score_manifest",
]

log = logging.getLogger(__name__)

#: Version of the score-table layout recorded in the parquet metadata.
TABLE_FORMAT = 1
#: Column suffix of prompt-dependent rewards scored with the synthetic caption.
SYNTHETIC_SUFFIX = "@synthetic"
_META_KEY = b"miroflow"


class ScoreError(RuntimeError):
    """Scoring failed; the message names the shard, the reward and/or the keys involved."""


# ---------------------------------------------------------------------------------------- URIs


def _stem(shard_uri: str) -> str:
    """``.../train-000003.tar`` → ``train-000003``."""
    name = PurePosixPath(shard_uri.rstrip("/")).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _parent_name(shard_uri: str) -> str:
    """Name of the folder holding the shard, or ``""`` at a bucket/filesystem root."""
    p = parse_uri(shard_uri)
    if p.kind == "s3":
        parts = [s for s in p.key.split("/") if s]
        return parts[-2] if len(parts) >= 2 else ""
    return p.path.parent.name


def score_table_uri(params: Params, shard_uri: str) -> str:
    """``<storage.root>/scores/<dataset>/<shard-stem>.parquet``.

    ``<dataset>`` is the shard's parent folder name (``prepare`` puts shards under
    ``<root>/shards/<data-hash>/``, so this is the data hash), or ``data_hash(params.data)`` for a
    shard at the top of a bucket or filesystem.
    """
    dataset = _parent_name(shard_uri)
    if not dataset or dataset in (".", ".."):
        from miroflow.prepare import data_hash

        dataset = data_hash(params.data)
    return join_uri(params.storage.root, "scores", dataset, f"{_stem(shard_uri)}.parquet")


def failures_uri(table_uri: str) -> str:
    """``<stem>.parquet`` → ``<stem>.failures.jsonl`` (same folder)."""
    base = table_uri[: -len(".parquet")] if table_uri.endswith(".parquet") else table_uri
    return base + ".failures.jsonl"


# ---------------------------------------------------------------------------------------- rewards


def _factory(name: str) -> Callable[..., Reward]:
    """The registered factory of ``name``. Raises RewardNotFound listing the valid names."""
    valid = available_rewards()  # also imports the built-in rewards
    if name not in valid:
        raise RewardNotFound(f"unknown reward {name!r} in score.rewards; valid rewards: {', '.join(valid)}")
    from miroflow.rewards.base import get_reward_factory

    return get_reward_factory(name)


def _static_attr(factory: Callable[..., Reward], attr: str) -> Any:
    """A class attribute of the factory's annotated return class, if it cannot vary per instance.

    Returns ``None`` when the return class is unknown, lacks the attribute, or its ``__init__``
    accepts an argument of that name (so the instance may override it).
    """
    try:
        ret = typing.get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: fall back to building the reward
        return None
    if not isinstance(ret, type):
        return None
    value = getattr(ret, attr, None)
    if value is None or (isinstance(value, str) and not value):
        return None
    try:
        init_params = inspect.signature(ret.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    if attr in init_params:
        return None
    return value


_CACHE: dict[tuple[str, str], Reward] = {}
_CACHE_LOCK = threading.Lock()


def clear_reward_cache() -> None:
    """Forget every reward built by :class:`LazyReward` in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


class LazyReward:
    """A :class:`~miroflow.rewards.Reward` that builds the real reward on first use.

    Args:
        name: registered reward name.
        kwargs: keyword arguments for its factory (already filtered to what it accepts).

    ``name`` never builds; ``version`` builds only when it cannot be read from the class (see the
    module docstring); ``uses_prompt``, ``score`` and ``normalize`` build. Built rewards are shared
    per process through a cache keyed by name and kwargs.
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None) -> None:
        self.name = name
        self.kwargs = dict(kwargs or {})
        self._factory = _factory(name)
        self._key = (name, json.dumps(self.kwargs, sort_keys=True, default=str))

    @property
    def built(self) -> bool:
        """Whether the underlying reward has been built in this process."""
        with _CACHE_LOCK:
            return self._key in _CACHE

    def get(self) -> Reward:
        """The real reward (built once per process and cached)."""
        with _CACHE_LOCK:
            if self._key not in _CACHE:
                try:
                    reward = self._factory(**self.kwargs)
                except Exception as err:
                    raise ScoreError(
                        f"reward {self.name!r}: cannot build it with {sorted(self.kwargs)} "
                        f"({type(err).__name__}: {err})"
                    ) from err
                if getattr(reward, "name", self.name) != self.name:
                    log.warning("reward registered as %r reports name %r", self.name, reward.name)
                _CACHE[self._key] = reward
            return _CACHE[self._key]

    @property
    def version(self) -> str:
        """Reward version: from the class when static, else from the built reward."""
        static = _static_attr(self._factory, "version")
        if isinstance(static, str):
            return static
        return str(self.get().version)

    @property
    def uses_prompt(self) -> bool:
        """Whether the reward reads the prompt (builds the reward)."""
        return bool(self.get().uses_prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw scores ``[B]`` for images ``[B, 3, H, W]`` in [0, 1] (delegates)."""
        return self.get().score(images, prompts)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised scores ``[N]`` (delegates)."""
        return self.get().normalize(raw)

    def __repr__(self) -> str:
        return f"LazyReward({self.name!r}, built={self.built})"


def load_rewards(cfg: ScoreConfig) -> list[Reward]:
    """Lazy rewards for ``cfg.rewards`` in order (nothing is built here).

    Each factory gets ``weights=cfg.reward_weights[name]`` (only when configured) and
    ``device=cfg.device`` (only when the factory declares a ``device`` parameter); weights for a
    factory that accepts neither ``weights`` nor ``**kwargs`` are an error naming the reward.

    Raises:
        RewardNotFound: an unknown reward name (the message lists the valid ones).
        ValueError: duplicate names, or weights a reward cannot take.
    """
    names = list(cfg.rewards)
    if not names:
        raise ValueError("score.rewards: empty; name at least one reward")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"score.rewards: duplicate reward(s) {dupes}")
    for extra in sorted(set(cfg.reward_weights) - set(names)):
        log.warning("score.reward_weights.%s is set but %r is not in score.rewards; ignored", extra, extra)
    out: list[Reward] = []
    for name in names:
        factory = _factory(name)
        params = inspect.signature(factory).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs: dict[str, Any] = {}
        weights = cfg.reward_weights.get(name)
        if weights is not None:
            if "weights" not in params and not var_kw:
                raise ValueError(f"score.reward_weights.{name}: reward {name!r} takes no weights")
            kwargs["weights"] = weights
        if "device" in params:
            kwargs["device"] = cfg.device
        out.append(LazyReward(name, kwargs))
    return out


def _versions(rewards: list[Reward]) -> dict[str, str]:
    return {r.name: str(r.version) for r in rewards}


# ---------------------------------------------------------------------------------------- tables


def read_table_meta(uri: str, storage: Storage) -> dict[str, Any] | None:
    """The ``miroflow`` metadata of the score table at ``uri``, or ``None`` if there is no table.

    Raises:
        ScoreError: the object exists but is not a score table we wrote.
    """
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        schema = pq.read_schema(io.BytesIO(data))
        raw = (schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ValueError("no 'miroflow' schema metadata")
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("rewards"), dict):
            raise ValueError("metadata lacks a 'rewards' mapping")
    except Exception as err:
        raise ScoreError(f"score table {uri} is unreadable or foreign: {type(err).__name__}: {err}") from err
    return meta


def load_score_table(uri: str, storage: Storage | None = None) -> pd.DataFrame:
    """Read a score table as a ``pandas.DataFrame`` (``[n rows, 1 + 2·columns]``).

    ``df.attrs["miroflow"]`` holds the table metadata (rewards, shard, shard_sha256, ...).
    """
    import pyarrow.parquet as pq

    storage = storage or Storage()
    data = storage.read_bytes(uri)
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:
        raise ScoreError(f"score table {uri} is not readable parquet: {type(err).__name__}: {err}") from err
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_META_KEY)
    df.attrs["miroflow"] = json.loads(raw.decode("utf-8")) if raw else {}
    return df


class _HashingReader:
    """Read-only stream wrapper that sha256-hashes everything read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n) if n is not None and n >= 0 else self._stream.read()
        self._hash.update(data)
        return data

    def drain_hexdigest(self) -> str:
        """Read what is left (tar end padding) and return the hex digest of the whole stream."""
        while self.read(1 << 20):
            pass
        return self._hash.hexdigest()

    def close(self) -> None:
        self._stream.close()


def _to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """``B × uint8 [H, W, 3]`` (same size) → float32 ``[B, 3, H, W]`` in [0, 1]."""
    arr = np.stack(images, axis=0)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


class _ShardScorer:
    """Accumulates decoded samples, scores full batches, and collects columns for one shard."""

    def __init__(self, shard_uri: str, rewards: list[Reward], batch_size: int) -> None:
        self.shard = shard_uri
        self.rewards = rewards
        self.batch_size = batch_size
        self.uses_prompt = {r.name: bool(r.uses_prompt) for r in rewards}
        self.keys: list[str] = []
        self.cols: dict[str, list[np.ndarray]] = {}
        self.syn_cols: dict[str, list[np.ndarray]] = {}
        self.any_synthetic = False
        self._pending: list[tuple[str, np.ndarray, str, str | None]] = []

    def add(self, key: str, image: np.ndarray, caption: str, synthetic: str | None) -> None:
        self._pending.append((key, image, caption, synthetic))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def _run(self, reward: Reward, images: torch.Tensor, prompts: list[str], keys: list[str], tag: str) -> np.ndarray:
        """Raw scores ``[B]`` float64 of one reward on one batch; errors name reward/shard/keys."""
        where = f"reward {reward.name!r} on shard {self.shard} (keys {keys[0]}..{keys[-1]}{tag})"
        try:
            out = reward.score(images, prompts)
        except Exception as err:
            raise ScoreError(f"{where} failed: {type(err).__name__}: {err}") from err
        vals = torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(-1).numpy()
        if vals.shape[0] != len(keys):
            raise ScoreError(f"{where} returned {vals.shape[0]} values for {len(keys)} images")
        if np.any(np.isinf(vals)):
            bad = [keys[i] for i in np.flatnonzero(np.isinf(vals))[:5]]
            raise ScoreError(f"{where} returned ±inf for keys {bad}")
        return vals

    def flush(self) -> None:
        """Score the pending samples (grouped by image size) and append their rows."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, img, _, _) in enumerate(pending):
            groups.setdefault(tuple(img.shape), []).append(i)
        for idx in groups.values():
            keys = [pending[i][0] for i in idx]
            images = _to_batch([pending[i][1] for i in idx])  # decoded once, shared by all rewards
            prompts = [pending[i][2] for i in idx]
            syn_pos = [j for j, i in enumerate(idx) if pending[i][3] is not None]
            self.keys.extend(keys)
            for r in self.rewards:
                raw = self._run(r, images, prompts, keys, "")
                self.cols.setdefault(r.name, []).append(raw)
                if not self.uses_prompt[r.name]:
                    continue
                syn = np.full(len(idx), np.nan, dtype=np.float64)
                if syn_pos:
                    sel = torch.as_tensor(syn_pos, dtype=torch.long)
                    sub_imgs = images if len(syn_pos) == len(idx) else images.index_select(0, sel)
                    sub_keys = [keys[j] for j in syn_pos]
                    sub_prompts = [str(pending[idx[j]][3]) for j in syn_pos]
                    syn[syn_pos] = self._run(r, sub_imgs, sub_prompts, sub_keys, ", synthetic captions")
                self.syn_cols.setdefault(r.name, []).append(syn)

    def _normalize(self, r: Reward, raw: np.ndarray) -> np.ndarray:
        if raw.size == 0:
            return raw.copy()
        try:
            norm = torch.as_tensor(r.normalize(torch.from_numpy(raw.astype(np.float32)))).to(torch.float64).numpy()
        except Exception as err:
            raise ScoreError(f"reward {r.name!r}: normalize failed on shard {self.shard}: {err}") from err
        norm = norm.reshape(-1).copy()
        norm[np.isnan(raw)] = np.nan  # absent stays absent
        return norm

    def columns(self) -> dict[str, np.ndarray]:
        """Final columns ``{name: [n]}`` in table order (``key`` first)."""
        self.flush()
        out: dict[str, np.ndarray] = {"key": np.asarray(self.keys, dtype=object)}
        for r in self.rewards:
            raw = np.concatenate(self.cols.get(r.name, [])) if self.cols.get(r.name) else np.zeros(0)
            out[f"{r.name}.raw"] = raw
            out[r.name] = self._normalize(r, raw)
            if self.uses_prompt[r.name] and self.any_synthetic:
                s = np.concatenate(self.syn_cols.get(r.name, [])) if self.syn_cols.get(r.name) else np.zeros(0)
                out[f"{r.name}{SYNTHETIC_SUFFIX}.raw"] = s
                out[f"{r.name}{SYNTHETIC_SUFFIX}"] = self._normalize(r, s)
        return out


def _table_bytes(columns: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {
        name: pa.array(col.tolist() if name == "key" else col, type=pa.string() if name == "key" else pa.float64())
        for name, col in columns.items()
    }
    table = pa.table(arrays)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8")})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _iter_records(
    reader: _HashingReader, shard_uri: str, failures: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Records of the shard; rejected groups/members go to ``failures`` (scope ``sample``)."""

    def on_reject(rec: dict[str, Any]) -> None:
        failures.append(
            {"key": rec.get("key"), "reason": str(rec.get("reason")), "scope": "sample",
             **({"member": rec["member"]} if "member" in rec else {})}
        )

    # iter_tar_groups raises ShardError (naming the shard) for a truncated or corrupt tar itself
    for key, group in iter_tar_groups(reader, shard_uri, on_reject=on_reject):  # type: ignore[arg-type]
        rec = group_to_record(key, group, shard_uri)
        if isinstance(rec, str):
            failures.append({"key": key, "reason": rec, "scope": "sample"})
            continue
        yield rec



_Decoded = tuple[str, np.ndarray, str, str | None, bool]


def _decoded_samples(reader: _HashingReader, shard_uri: str, failures: list[dict[str, Any]]) -> Iterator[_Decoded]:
    """``(key, image uint8 [H, W, 3], caption, synthetic caption or None, has json.captions)`` per usable sample.

    Unusable samples are appended to ``failures`` (see the module docstring) and not yielded.
    """
    for rec in _iter_records(reader, shard_uri, failures):
        key = rec["key"]
        caption = rec.get("txt")
        if caption is None or not caption.strip():
            failures.append({"key": key, "reason": "missing or empty caption (.txt)", "scope": "sample"})
            continue
        try:
            image = decode_image(rec["image_bytes"], name=f"shard {shard_uri} key {key!r}")
        except ValueError as err:
            failures.append({"key": key, "reason": str(err), "scope": "sample"})
            continue
        synthetic: str | None = None
        caps = rec["json"].get("captions") if isinstance(rec.get("json"), dict) else None
        if caps is not None:
            syn = caps.get("synthetic") if isinstance(caps, dict) else None
            if isinstance(syn, str) and syn.strip():
                synthetic = syn
            else:
                failures.append({"key": key, "reason": "json.captions has no non-empty 'synthetic' caption; "
                                 "@synthetic columns are NaN", "scope": "synthetic"})
        yield key, image, caption, synthetic, caps is not None


class _Prefetch:
    """Run an iterator in a background thread (bounded queue), so reading/decoding overlaps scoring.

    Exceptions of the producer are re-raised in the consumer; :meth:`close` stops the producer.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], maxsize: int) -> None:
        import queue

        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._source = source
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="miroflow-score-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer, re-raised there
            self._error = err
        self._put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self) -> None:
        """Stop the producer and wait for it."""
        self._stop.set()
        self._thread.join()


class _Inline:
    """The :class:`_Prefetch` interface without a thread (local shards)."""

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source

    def __iter__(self) -> Iterator[Any]:
        return iter(self._source)

    def close(self) -> None:
        """Nothing to stop."""


def score_shard(
    shard_uri: str,
    rewards: list[Reward],
    out_uri: str,
    storage: Storage,
    batch_size: int = 64,
    progress: bool = True,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Score every sample of one shard with every reward and write its table (atomically).

    Args:
        shard_uri: webdataset tar (samples ``key.{png,jpg}``, ``key.txt``, optional ``key.json``).
        rewards: rewards to run (``score(images [B,3,H,W] in [0,1], prompts [B]) -> [B]``).
        out_uri: table URI (``.parquet``); failures go to :func:`failures_uri` of it.
        storage: storage for the shard, the table and the failures file.
        batch_size: images per reward call.
        progress: show a tqdm bar (samples).
        expected_sha256: the shard's sha256 from the manifest; a mismatch is an error, and an
            existing table for other shard bytes is rescored.

    Returns:
        ``{"shard", "uri", "n" (rows), "failures" (count), "failures_uri", "sha256" (table bytes or
        None when skipped), "skipped" (bool)}``.

    Raises:
        ScoreError: a reward raised or returned a wrong shape/±inf, or the shard bytes do not match.
        ShardError: the shard is not a readable tar (names the shard).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward names {names}")
    fail_uri = failures_uri(out_uri)
    meta = read_table_meta(out_uri, storage)
    if meta is not None:
        same_rewards = meta["rewards"] == _versions(rewards)  # same names and versions (order-free)
        same_shard = expected_sha256 is None or meta.get("shard_sha256") == expected_sha256
        if same_rewards and same_shard:
            log.info("shard %s already scored in %s; skipped", shard_uri, out_uri)
            return {"shard": shard_uri, "uri": out_uri, "n": int(meta.get("n", -1)),
                    "failures": int(meta.get("failures", 0)), "failures_uri": fail_uri,
                    "sha256": None, "skipped": True}
        log.info("shard %s: existing table %s is stale (rewards %s, want %s); rescoring",
                 shard_uri, out_uri, meta.get("rewards"), _versions(rewards))

    versions = _versions(rewards)
    scorer = _ShardScorer(shard_uri, rewards, batch_size)
    failures: list[dict[str, Any]] = []
    reader = _HashingReader(storage.open_read(shard_uri))
    decoded = _decoded_samples(reader, shard_uri, failures)
    # A reader thread pays off only when reads wait on the network: for local shards it merely
    # competes with the rewards for the GIL (engine/pure 1.50 with it vs 1.38 without, 2 cores).
    samples = _Prefetch(decoded, maxsize=2 * batch_size) if parse_uri(shard_uri).kind == "s3" else _Inline(decoded)
    try:
        bar = tqdm(desc=f"score {_stem(shard_uri)}", unit="img", disable=not progress, leave=False)
        for key, image, caption, synthetic, has_captions in samples:
            bar.update(1)
            scorer.any_synthetic |= has_captions
            scorer.add(key, image, caption, synthetic)
        bar.close()
        columns = scorer.columns()
        shard_sha = reader.drain_hexdigest()
    finally:
        samples.close()
        reader.close()
    if expected_sha256 is not None and shard_sha != expected_sha256:
        raise ScoreError(f"shard {shard_uri}: sha256 {shard_sha} does not match the manifest's {expected_sha256}")

    n = len(columns["key"])
    table_meta = {"format": TABLE_FORMAT, "rewards": versions, "shard": shard_uri, "shard_sha256": shard_sha,
                  "n": n, "failures": len(failures), "synthetic": scorer.any_synthetic}
    fail_text = "".join(json.dumps(f, sort_keys=True, ensure_ascii=False) + "\n" for f in failures)
    storage.write_bytes(fail_uri, fail_text.encode("utf-8"))
    data = _table_bytes(columns, table_meta)
    storage.write_bytes(out_uri, data)  # last: the table is the commit marker
    if failures:
        log.warning("shard %s: %d failure(s) listed in %s", shard_uri, len(failures), fail_uri)
    return {"shard": shard_uri, "uri": out_uri, "n": n, "failures": len(failures), "failures_uri": fail_uri,
            "sha256": sha256_bytes(data), "skipped": False}


# ---------------------------------------------------------------------------------------- stages


def write_score_manifest(path: str | Path, rewards: dict[str, str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the local score manifest (JSON, atomic) and return it.

    Content: ``{"version": 1, "rewards": {name: version}, "tables": [{"shard", "uri", "n",
    "failures", "failures_uri"}], "num_rows": int}`` (tables sorted by shard URI).
    """
    tables = sorted(
        ({"shard": e["shard"], "uri": e["uri"], "n": int(e["n"]), "failures": int(e["failures"]),
          "failures_uri": e.get("failures_uri") or failures_uri(e["uri"])} for e in entries),
        key=lambda t: t["shard"],
    )
    manifest = {"version": 1, "rewards": dict(rewards), "tables": tables,
                "num_rows": int(sum(t["n"] for t in tables))}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    Storage(retries=0).write_bytes(str(p), text.encode("utf-8"))
    return manifest


def read_score_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a score manifest written by :func:`write_score_manifest`.

    Raises:
        ScoreError: missing file (run the score stage first), bad JSON or missing fields.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ScoreError(f"score manifest {p} does not exist (run the score stage first)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ScoreError(f"score manifest {p} is unreadable: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("rewards"), dict) or not isinstance(data.get("tables"), list):
        raise ScoreError(f"score manifest {p}: expected {{'rewards': {{...}}, 'tables': [...]}}")
    for i, t in enumerate(data["tables"]):
        if not isinstance(t, dict) or not isinstance(t.get("uri"), str):
            raise ScoreError(f"score manifest {p}: tables[{i}] lacks a 'uri'")
    return data


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
        entries.append(score_shard(s["uri"], rewards, score_table_uri(params, s["uri"]), storage,
                                   batch_size=params.score.batch_size, expected_sha256=s["sha256"]))
    done = sum(1 for e in entries if e["skipped"])
    log.info("scored %d shard(s), %d already up to date", len(entries) - done, done)
    return write_score_manifest(params.score.manifest, _versions(rewards), entries)


def run_bin(params: Params, storage: Storage | None = None) -> BinSet:
    """Stage bin: fit quantile bins per reward from the tables in ``params.score.manifest``.

    For each reward ``r`` of the manifest, the normalised values of column ``r`` and (if present)
    ``r@synthetic`` are pooled; NaN values are absent and ignored. ``fit_bins`` then draws at most
    ``score.bin_max_samples`` of them (seed 0) and fits ``score.num_bins`` quantile bins. The result
    is saved to ``params.score.bins`` and copied to ``<root>/bins/bins-<hash>.json``.

    Raises:
        ScoreError: the manifest is missing/stale (other rewards than ``score.rewards``) or a table
            was written for other reward versions than the manifest says.
        BinFitError: a reward has no finite values (names it).
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
    for t in tqdm(manifest["tables"], desc="bin: read tables", unit="table"):
        df = load_score_table(t["uri"], storage)
        if df.attrs["miroflow"].get("rewards") != versions:
            raise ScoreError(
                f"score table {t['uri']} has rewards {df.attrs['miroflow'].get('rewards')}, "
                f"the manifest says {versions}; rerun the score stage"
            )
        for name in versions:
            if name not in df.columns:
                raise ScoreError(f"score table {t['uri']} has no column {name!r}")
            pooled[name].append(df[name].to_numpy(dtype=np.float64))
            syn = f"{name}{SYNTHETIC_SUFFIX}"
            if syn in df.columns:
                pooled[name].append(df[syn].to_numpy(dtype=np.float64))
    values = {name: (np.concatenate(cols) if cols else np.zeros(0)) for name, cols in pooled.items()}
    binset = fit_bins(values, num_bins=params.score.num_bins, max_samples=params.score.bin_max_samples,
                      versions=versions)
    save_bins(binset, params.score.bins)
    text = json.dumps(binset.to_json(), indent=2, allow_nan=False) + "\n"
    storage.write_bytes(join_uri(params.storage.root, "bins", f"bins-{binset.hash}.json"), text.encode("utf-8"))
    return binset
