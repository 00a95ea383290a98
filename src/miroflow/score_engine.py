"""The shard scorer behind stage *score*: one shard in, one score table (+ failures file) out.

Engine
------
The shard is streamed once (its sha256 is computed on the way). Each image is decoded exactly once
(``uint8 [H, W, 3]`` → float ``[B, 3, H, W]`` / 255, batched by identical size) and every reward
runs on that one batch. For S3 shards, reading the tar and decoding run in a background thread
(bounded queue) so they overlap reward compute. Image-only rewards (``uses_prompt`` False) run once
per batch even when two captions exist; prompt-dependent rewards run with the ``.txt`` caption and,
for the samples that have one, with the synthetic caption.

Failures (decision): a sample whose image cannot be decoded, whose ``.txt`` caption is missing or
empty, or that the shard reader rejects (unsafe member, bad JSON, ...) is **not in the table**; it
is listed in ``<stem>.failures.jsonl`` as ``{"key", "reason", "scope": "sample"}`` (a member-level
rejection without a key carries ``"member"`` and ``"key": null``). Keeping such keys out of the table
means the table holds only samples a trainer can use; the failures file is the audit trail. A
sample whose ``json["captions"]`` exists but has no usable synthetic caption stays in the table with
NaN ``@synthetic`` columns and gets a failure line with ``"scope": "synthetic"``. These never stop
the run. A reward that *raises* on a batch is a real error: :class:`ScoreError` names the reward,
the shard and the batch's first/last key, chained to the original exception.

Idempotence and atomicity: the failures file, the table's hash record (``<stem>.parquet.sha256``)
and then the table are written through :class:`~miroflow.storage.Storage` (temp file + rename
locally, one PUT on S3), so a half-written table is never visible; the table is the commit marker.
A shard whose table exists, matches its hash record (or, written without one, parses in full) and
has the same reward names and versions (read from the parquet metadata; and the same shard sha256
when the caller knows it) is skipped without building or calling any reward model. A table that
fails that check (damaged, truncated, foreign) is rescored, with a warning naming it.

The table format is :mod:`miroflow.data.score_tables`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from miroflow.data.score_tables import (
    SYNTHETIC_SUFFIX,
    TABLE_FORMAT,
    ScoreError,
    ScoreInputError,
    TableCheck,
    check_score_table,
    failures_uri,
    table_bytes,
    table_hash_record,
    table_hash_uri,
)
from miroflow.data.shards import RECORD_EXTS, decode_image, group_to_record, iter_tar_groups
from miroflow.rewards import Reward, reward_versions
from miroflow.storage import Storage, parse_uri, sha256_bytes

__all__ = ["shard_stem", "to_batch", "score_shard"]

log = logging.getLogger(__name__)


def shard_stem(shard_uri: str) -> str:
    """``.../train-000003.tar`` → ``train-000003``."""
    name = PurePosixPath(shard_uri.rstrip("/")).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


class _HashingRaw(io.RawIOBase):
    """Raw read-only stream that sha256-hashes every byte read from the wrapped stream."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the wrapped stream (one read), hashing what came."""
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        return n


class _HashingReader:
    """Read-only stream that sha256-hashes everything read through it.

    Reads are served by a C ``io.BufferedReader`` over :class:`_HashingRaw` (1 MiB per refill), so
    the tar reader's many small reads (two per member) cost no Python call and no hash update each;
    the digest covers every byte of the stream exactly once, in order, whatever the read sizes.
    """

    def __init__(self, stream: IO[bytes], buffer_size: int = 1 << 20) -> None:
        self._raw = _HashingRaw(stream)
        self._buf = io.BufferedReader(self._raw, buffer_size=buffer_size)
        self.read = self._buf.read  # bound C method: no Python frame per read

    def drain_hexdigest(self) -> str:
        """Read what is left (tar end padding) and return the hex digest of the whole stream."""
        while self._buf.read(1 << 20):
            pass
        return self._raw.hash.hexdigest()

    def close(self) -> None:
        """Close the underlying stream."""
        self._raw._stream.close()


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """``B × uint8 [H, W, 3]`` (same size) → float32 ``[B, 3, H, W]`` in [0, 1] (a view of ``[B, H, W, 3]`` memory).

    Converted in numpy: uint8 → float32 is exact and ``/ 255`` is one correctly rounded IEEE division
    either way, so the values and strides equal ``torch.from_numpy(arr).permute(0, 3, 1, 2).to(float32)
    .div_(255)`` bit for bit (checked over all 256 values), without waking torch's thread pool for a
    small elementwise op.
    """
    arr = np.stack(images, axis=0).astype(np.float32)
    arr /= np.float32(255.0)
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


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
            images = to_batch([pending[i][1] for i in idx])  # decoded once, shared by all rewards
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


def _iter_records(reader: _HashingReader, shard_uri: str, failures: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Records of the shard; rejected groups/members go to ``failures`` (scope ``sample``)."""

    def on_reject(rec: dict[str, Any]) -> None:
        failures.append(
            {
                "key": rec.get("key"),
                "reason": str(rec.get("reason")),
                "scope": "sample",
                **({"member": rec["member"]} if "member" in rec else {}),
            }
        )

    # iter_tar_groups raises ShardError (naming the shard) for a truncated or corrupt tar itself
    for key, group in iter_tar_groups(reader, shard_uri, on_reject=on_reject, keep=RECORD_EXTS):  # type: ignore[arg-type]
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
                failures.append(
                    {
                        "key": key,
                        "reason": "json.captions has no non-empty 'synthetic' caption; @synthetic columns are NaN",
                        "scope": "synthetic",
                    }
                )
        yield key, image, caption, synthetic, caps is not None


class _Prefetch:
    """Run an iterator in a background thread (bounded queue), so reading/decoding overlaps scoring.

    Exceptions of the producer are re-raised in the consumer; :meth:`close` stops the producer.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], maxsize: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._source = source
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="miroflow-score-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
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


def skipped_result(shard_uri: str, out_uri: str, check: TableCheck) -> dict[str, Any]:
    """The :func:`score_shard` result for an intact, up-to-date table (``check`` of ``out_uri``)."""
    assert check.meta is not None
    log.info("shard %s already scored in %s; skipped", shard_uri, out_uri)
    return {
        "shard": shard_uri,
        "uri": out_uri,
        "n": int(check.meta.get("n", -1)),
        "failures": int(check.meta.get("failures", 0)),
        "failures_uri": failures_uri(out_uri),
        "sha256": check.sha256 if check.verified else None,
        "skipped": True,
    }


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
        ``{"shard", "uri", "n" (rows), "failures" (count), "failures_uri", "sha256" (of the table
        bytes; None for a skipped table that has no hash record), "skipped" (bool)}``.

    Raises:
        ScoreError: a reward raised or returned a wrong shape/±inf. ScoreInputError (a ScoreError,
            exit 2): the shard bytes do not match ``expected_sha256``.
        ShardError: the shard is not a readable tar (names the shard).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward names {names}")
    fail_uri = failures_uri(out_uri)
    check = check_score_table(out_uri, storage)
    if check.problem is not None:
        log.warning(
            "shard %s: existing score table %s is not intact (%s); rescoring", shard_uri, out_uri, check.problem
        )
    meta = check.meta
    if meta is not None:
        same_rewards = meta["rewards"] == reward_versions(rewards)  # same names and versions (order-free)
        same_shard = expected_sha256 is None or meta.get("shard_sha256") == expected_sha256
        if same_rewards and same_shard:
            return skipped_result(shard_uri, out_uri, check)
        log.info(
            "shard %s: existing table %s is stale (rewards %s, want %s); rescoring",
            shard_uri,
            out_uri,
            meta.get("rewards"),
            reward_versions(rewards),
        )

    versions = reward_versions(rewards)
    scorer = _ShardScorer(shard_uri, rewards, batch_size)
    failures: list[dict[str, Any]] = []
    reader = _HashingReader(storage.open_read(shard_uri))
    decoded = _decoded_samples(reader, shard_uri, failures)
    # A reader thread pays off only when reads wait on the network: for local shards it merely
    # competes with the rewards for the GIL (engine/pure 1.50 with it vs 1.38 without, 2 cores).
    samples = _Prefetch(decoded, maxsize=2 * batch_size) if parse_uri(shard_uri).kind == "s3" else _Inline(decoded)
    try:
        bar = tqdm(desc=f"score {shard_stem(shard_uri)}", unit="img", disable=not progress, leave=False)
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
        raise ScoreInputError(f"shard {shard_uri}: sha256 {shard_sha} does not match the manifest's {expected_sha256}")

    n = len(columns["key"])
    table_meta = {
        "format": TABLE_FORMAT,
        "rewards": versions,
        "shard": shard_uri,
        "shard_sha256": shard_sha,
        "n": n,
        "failures": len(failures),
        "synthetic": scorer.any_synthetic,
    }
    fail_text = "".join(json.dumps(f, sort_keys=True, ensure_ascii=False) + "\n" for f in failures)
    storage.write_bytes(fail_uri, fail_text.encode("utf-8"))
    data = table_bytes(columns, table_meta)
    storage.write_bytes(table_hash_uri(out_uri), table_hash_record(data, out_uri))
    storage.write_bytes(out_uri, data)  # last: the table is the commit marker
    if failures:
        log.warning("shard %s: %d failure(s) listed in %s", shard_uri, len(failures), fail_uri)
    return {
        "shard": shard_uri,
        "uri": out_uri,
        "n": n,
        "failures": len(failures),
        "failures_uri": fail_uri,
        "sha256": sha256_bytes(data),
        "skipped": False,
    }
