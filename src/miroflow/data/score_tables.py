"""Score tables and the score manifest: the on-disk format written by the score stage, read by bin and train.

Score tables (docs/architecture.md, "Score tables")
---------------------------------------------------
One parquet file per shard, ``<root>/scores/<dataset>/<shard-stem>.parquet`` (see
:func:`miroflow.score.score_table_uri`). Columns, in order::

    key                                  str
    for each reward r (params order):
        r.raw            float64   raw reward value (NaN = absent / failed)
        r                float64   r.normalize(raw), ≈ [0, 1]; NaN stays NaN
        r@synthetic.raw  float64   only for prompt-dependent rewards, only when the shard's
        r@synthetic      float64   samples carry ``json["captions"]["synthetic"]``

Schema metadata key ``miroflow`` holds JSON ``{"rewards": {name: version}, "shard": uri,
"shard_sha256": hex, "n": rows, "failures": count, "synthetic": bool, "format": 1}``. Next to each
table, ``<stem>.failures.jsonl`` lists the samples left out of it (:func:`failures_uri`), and
``<stem>.parquet.sha256`` holds the sha256 of the table's bytes in ``sha256sum`` format
(``"<hex>  <stem>.parquet\n"``, :func:`table_hash_uri`). The score stage writes it *before* the
table (the table stays the commit marker) and checks it before trusting a table on resume
(:func:`check_score_table`); :func:`load_score_table` checks it too. A table without one (written
before the record existed) is trusted once it parses in full.

Score manifest
--------------
A local JSON file ``{"version": 1, "rewards": {name: version}, "tables": [{"shard", "uri", "n",
"failures", "failures_uri"}], "num_rows": int}`` listing every table of one score run.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miroflow.errors import InputError, OperationalError
from miroflow.storage import Storage, sha256_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "TABLE_FORMAT",
    "SYNTHETIC_SUFFIX",
    "ScoreError",
    "ScoreInputError",
    "failures_uri",
    "table_hash_uri",
    "table_hash_record",
    "TableCheck",
    "check_score_table",
    "table_bytes",
    "read_table_meta",
    "load_score_table",
    "finite_or_nan",
    "write_score_manifest",
    "read_score_manifest",
]

#: Version of the score-table layout recorded in the parquet metadata.
TABLE_FORMAT = 1
#: Column suffix of prompt-dependent rewards scored with the synthetic caption.
SYNTHETIC_SUFFIX = "@synthetic"
_META_KEY = b"miroflow"
_HASH_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)\n?$")


class ScoreError(OperationalError, RuntimeError):
    """Scoring failed; the message names the shard, the reward and/or the keys involved."""


class ScoreInputError(InputError, ScoreError):
    """A score input is bad (a score manifest that is not JSON, a table lacking a column or holding
    ±inf, a shard whose bytes do not match its manifest entry): the CLI exits 2. Still a
    :class:`ScoreError` for callers that catch that."""


def failures_uri(table_uri: str) -> str:
    """``<stem>.parquet`` → ``<stem>.failures.jsonl`` (same folder)."""
    base = table_uri[: -len(".parquet")] if table_uri.endswith(".parquet") else table_uri
    return base + ".failures.jsonl"


def table_hash_uri(table_uri: str) -> str:
    """``<stem>.parquet`` → ``<stem>.parquet.sha256`` (the table's hash record, same folder)."""
    return table_uri + ".sha256"


def table_hash_record(data: bytes, table_uri: str) -> bytes:
    """The content of :func:`table_hash_uri`: ``"<sha256 of data>  <table file name>\n"`` (``sha256sum`` format)."""
    return f"{sha256_bytes(data)}  {PurePosixPath(table_uri).name}\n".encode()


@dataclass(frozen=True)
class TableCheck:
    """What :func:`check_score_table` found at a table URI.

    Attributes:
        meta: the table's ``miroflow`` metadata when the table is intact, else None.
        sha256: the sha256 of the table's bytes when it is intact, else None.
        problem: why an existing table is not to be trusted (damaged, truncated, foreign), else None.
        verified: the table matched its hash record (False for a table written without one).
    """

    meta: dict[str, Any] | None
    sha256: str | None = None
    problem: str | None = None
    verified: bool = False


def check_score_table(uri: str, storage: Storage) -> TableCheck:
    """Check the score table at ``uri`` before trusting it (the score stage's resume check).

    - no table: ``TableCheck(None)``;
    - a hash record (:func:`table_hash_uri`) exists: the table's sha256 must match it, and its
      ``miroflow`` metadata must parse;
    - no hash record (a table written before records existed): the whole table must parse.

    Any failure is reported in ``problem`` (never raised), so the caller rescores the shard.
    """
    if not storage.exists(uri):
        return TableCheck(None)
    data = storage.read_bytes(uri)
    digest = sha256_bytes(data)
    hash_uri = table_hash_uri(uri)
    verified = storage.exists(hash_uri)
    if verified:
        recorded = _recorded_sha256(storage, hash_uri)
        if recorded is None:
            return TableCheck(None, problem=f"its hash record {hash_uri} is unreadable")
        if recorded != digest:
            return TableCheck(
                None,
                problem=f"sha256 {digest[:12]}… of its {len(data)} bytes does not match {recorded[:12]}… "
                f"recorded in {hash_uri} (damaged or truncated)",
            )
    try:
        if not verified:
            pq.read_table(io.BytesIO(data))  # no record: the whole table must at least parse
        meta = _meta_of(data)
    except Exception as err:
        return TableCheck(None, problem=f"unreadable or foreign: {type(err).__name__}: {err}")
    return TableCheck(meta, digest, None, verified)


def _recorded_sha256(storage: Storage, hash_uri: str) -> str | None:
    """The hex digest in the hash record at ``hash_uri`` (None if it is not one)."""
    m = _HASH_LINE.match(storage.read_bytes(hash_uri).decode("utf-8", errors="replace"))
    return m.group(1) if m else None


def _meta_of(data: bytes) -> dict[str, Any]:
    """The ``miroflow`` schema metadata of parquet ``data``; ValueError if absent or malformed."""
    schema = pq.read_schema(io.BytesIO(data))
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError("no 'miroflow' schema metadata")
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("rewards"), dict):
        raise ValueError("metadata lacks a 'rewards' mapping")
    return meta


def table_bytes(columns: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """Serialise one score table to parquet bytes.

    Args:
        columns: ``{"key": [n] object (str), <column>: [n] float64, ...}`` in table order.
        meta: the ``miroflow`` metadata (stored as sorted-key JSON).
    """
    arrays = {
        name: pa.array(col.tolist() if name == "key" else col, type=pa.string() if name == "key" else pa.float64())
        for name, col in columns.items()
    }
    table = pa.table(arrays)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8")})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_table_meta(uri: str, storage: Storage) -> dict[str, Any] | None:
    """The ``miroflow`` metadata of the score table at ``uri``, or ``None`` if there is no table.

    Raises:
        ScoreError: the object exists but is not a score table we wrote.
    """
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        return _meta_of(data)
    except Exception as err:
        raise ScoreError(f"score table {uri} is unreadable or foreign: {type(err).__name__}: {err}") from err


def load_score_table(uri: str, storage: Storage | None = None) -> pd.DataFrame:
    """Read a score table as a ``pandas.DataFrame`` (``[n rows, 1 + 2·columns]``).

    ``df.attrs["miroflow"]`` holds the table metadata (rewards, shard, shard_sha256, ...).

    Raises:
        ScoreError: the object is not readable parquet, or does not match its hash record
            (:func:`table_hash_uri`, checked when it exists).
    """
    storage = storage or Storage()
    data = storage.read_bytes(uri)
    hash_uri = table_hash_uri(uri)
    if storage.exists(hash_uri) and _recorded_sha256(storage, hash_uri) != sha256_bytes(data):
        raise ScoreError(
            f"score table {uri} does not match its hash record {hash_uri} (damaged or truncated); "
            "rerun the score stage to rescore it"
        )
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:
        raise ScoreError(f"score table {uri} is not readable parquet: {type(err).__name__}: {err}") from err
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_META_KEY)
    df.attrs["miroflow"] = json.loads(raw.decode("utf-8")) if raw else {}
    return df


def finite_or_nan(df: pd.DataFrame, column: str, table_uri: str) -> np.ndarray:
    """Column ``column`` of a score table as float64; ±inf (never a score) is an error naming table and column.

    NaN is the tables' "absent" value and passes through.
    """
    values = df[column].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isinf(values))
    if bad.size:
        keys = [str(k) for k in df["key"].to_numpy()[bad[:3]]] if "key" in df.columns else []
        raise ScoreInputError(
            f"score table {table_uri} column {column!r}: {bad.size} value(s) are ±inf (keys {keys}); "
            "scores must be finite or NaN (absent): rerun the score stage"
        )
    return values


def write_score_manifest(path: str | Path, rewards: dict[str, str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the local score manifest (JSON, atomic) and return it.

    Args:
        rewards: ``{name: version}`` of the run.
        entries: one ``{"shard", "uri", "n", "failures"[, "failures_uri"]}`` per table (more keys ignored).

    Content: ``{"version": 1, "rewards": {name: version}, "tables": [{"shard", "uri", "n",
    "failures", "failures_uri", "sha256", "rewards"}], "num_rows": int}`` (tables sorted by shard
    URI; per table the sha256 of its bytes — None for a table resumed without a hash record — and
    the reward versions it holds).
    """
    tables = sorted(
        (
            {
                "shard": e["shard"],
                "uri": e["uri"],
                "n": int(e["n"]),
                "failures": int(e["failures"]),
                "failures_uri": e.get("failures_uri") or failures_uri(e["uri"]),
                "sha256": e.get("sha256"),
                "rewards": dict(e.get("rewards") or rewards),
            }
            for e in entries
        ),
        key=lambda t: t["shard"],
    )
    manifest = {"version": 1, "rewards": dict(rewards), "tables": tables, "num_rows": int(sum(t["n"] for t in tables))}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    Storage(retries=0).write_bytes(str(p), text.encode("utf-8"))
    return manifest


def read_score_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a score manifest written by :func:`write_score_manifest`.

    Raises:
        ScoreError: missing or unreadable file (run the score stage first). ScoreInputError (a
            ScoreError, exit 2): not JSON, or missing fields.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ScoreError(f"score manifest {p} does not exist (run the score stage first)") from err
    except OSError as err:
        raise ScoreError(f"score manifest {p} is unreadable: {err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ScoreInputError(f"score manifest {p} is not valid JSON: {err}") from err
    ok = isinstance(data, dict) and isinstance(data.get("rewards"), dict) and isinstance(data.get("tables"), list)
    if not ok:
        raise ScoreInputError(f"score manifest {p}: expected {{'rewards': {{...}}, 'tables': [...]}}")
    for i, t in enumerate(data["tables"]):
        if not isinstance(t, dict) or not isinstance(t.get("uri"), str):
            raise ScoreInputError(f"score manifest {p}: tables[{i}] lacks a 'uri'")
    return data
