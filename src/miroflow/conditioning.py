"""Quantile binning of reward scores into MIRO conditioning values (docs/design.md §3, architecture "Bins").

Each reward gets ``num_bins`` quantile bins (64 by default) estimated on at most ``max_samples``
finite values. A score's *conditioning value* is its bin index mapped to the ``k / (num_bins - 1)``
grid, so it lies in ``[0, 1]``; a missing score (NaN) stays NaN ("absent"), never 0.

Exact mapping
-------------
For one reward with edges ``e[0] <= e[1] <= ... <= e[num_bins]`` (``e[0]`` / ``e[-1]`` are the
minimum / maximum of the fitting sample), the *interior* edges are ``e[1:-1]`` (``num_bins - 1``
of them) and, for a value ``v``::

    bin_index(v) = 0                                             if v <= e[0] < e[-1]
                 = #{ j in 1..num_bins-1 : e[j] <= v }           otherwise  (searchsorted(e[1:-1], v, "right"))
    cond(v)      = bin_index(v) / (num_bins - 1)

``bin_index`` is in ``[0, num_bins - 1]``: values below the fitted range land in bin 0 (cond 0.0)
and values above it in bin ``num_bins - 1`` (cond 1.0); ``-inf``/``+inf`` behave the same way.
The map is non-decreasing in ``v``.

Ties: when many samples share one value, several interior edges coincide. The mapping stays
well defined and monotone: all equal values share one bin; the bins between duplicate edges are
simply empty. Which bin (docs/design.md §3, "Scores and bins"):

* a value equal to the **minimum** ``e[0]`` goes to bin 0 (cond 0.0), so a reward that piles up
  at its minimum (e.g. 12% of the samples with alignment exactly 0) trains on the value 0 that a
  negative target asks for;
* a value equal to the **maximum** ``e[-1]`` goes to the top bin (cond 1.0);
* any other tied value goes to the bin *above* every edge equal to it (``side="right"``).

A constant column (``e[0] == e[-1]``) is the one case where both extremes coincide: every value
equal to the constant goes to the top bin (cond 1.0), values below it to 0.0 and values above it
to 1.0. No division by zero is involved anywhere.

Fitting
-------
:func:`fit_bins` ignores NaN (absent) values. If more than ``max_samples`` finite values remain,
exactly ``max_samples`` of them are drawn uniformly without replacement with
``np.random.default_rng(seed).choice(n_finite, max_samples, replace=False)`` (indices into the
finite values in their original order; the same ``seed`` is used for every reward, so the result
does not depend on the order of the rewards). Edges are ``np.quantile(sample, linspace(0, 1,
num_bins + 1))`` (linear interpolation), made non-decreasing with a running maximum to rule out
floating-point wobble. ``n`` records the number of values the edges were estimated on.

A reward whose values are all NaN (or that has no values) is an error naming the reward: an
entirely missing reward means its scorer failed, and silently training with a reward that is
always absent would hide that. ``±inf`` values are also an error (scores are never infinite).

File format (``manifests/bins.json``, see docs/architecture.md)::

    {"version": 1, "num_bins": 64,
     "rewards": {name: {"edges": [65 floats], "n": int, "version": str}},
     "hash": str}

``hash`` is the sha256 hex digest of the canonical JSON of the edges:
``json.dumps({name: edges_as_float_list, ...}, sort_keys=True, separators=(",", ":"),
allow_nan=False)`` encoded as UTF-8. It depends on the edges only (not on reward order,
``n`` or versions) and is verified on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from miroflow.errors import InputError

__all__ = [
    "BINS_FORMAT_VERSION",
    "BinsFormatError",
    "BinFitError",
    "RewardBins",
    "BinSet",
    "fit_bins",
    "save_bins",
    "load_bins",
    "edges_hash",
]

BINS_FORMAT_VERSION = 1


class BinsFormatError(InputError, ValueError):
    """A bins JSON document (or file) is malformed; the message names the file and/or the key."""


class BinFitError(InputError, ValueError):
    """Bins cannot be fitted for a reward (no finite values, infinities, bad arguments)."""


def _as_edges(edges: Any, where: str) -> np.ndarray:
    """Validate and copy edges into a read-only float64 array ``[num_bins + 1]``."""
    try:
        arr = np.array(edges, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BinsFormatError(f"{where}: edges must be a list of numbers ({exc})") from None
    if arr.ndim != 1 or arr.shape[0] < 3:
        raise BinsFormatError(
            f"{where}: edges must be a 1-D list of at least 3 numbers (num_bins >= 2), got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise BinsFormatError(f"{where}: edges must be finite")
    if np.any(np.diff(arr) < 0):
        raise BinsFormatError(f"{where}: edges must be non-decreasing")
    arr.setflags(write=False)
    return arr


@dataclass(eq=False)
class RewardBins:
    """Quantile bin edges of one reward.

    Attributes:
        name: reward name (column name in the score tables).
        edges: ``[num_bins + 1]`` float64, non-decreasing, finite; read-only copy.
        version: version string of the reward model the scores came from.
        n: number of values the edges were estimated on.
    """

    name: str
    edges: np.ndarray
    version: str
    n: int

    def __post_init__(self) -> None:
        self.edges = _as_edges(self.edges, f"rewards.{self.name}.edges")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise BinsFormatError(f"rewards.{self.name}.n: expected a positive int, got {self.n!r}")
        self.n = int(self.n)
        if not isinstance(self.version, str):
            raise BinsFormatError(f"rewards.{self.name}.version: expected a string, got {self.version!r}")

    @property
    def num_bins(self) -> int:
        """Number of bins (``len(edges) - 1``)."""
        return int(self.edges.shape[0]) - 1

    def bin_index(self, values: np.ndarray) -> np.ndarray:
        """Bin indices ``int64`` of the same shape as ``values`` (any shape).

        NaN inputs get index ``-1`` (callers should mask them; :meth:`transform` turns them back
        into NaN). See the module docstring for the exact rule.
        """
        v = np.asarray(values, dtype=np.float64)
        idx = self._index(v).astype(np.int64)
        return np.where(np.isnan(v), np.int64(-1), idx)

    def _index(self, v: np.ndarray) -> np.ndarray:
        """Bin index of float64 ``v`` (any shape; NaN gives some index, masked by the callers).

        The tie rule of the module docstring: ``side="right"`` except that a value at the minimum
        edge goes to bin 0 (unless the column is constant); at the maximum, ``side="right"``
        already gives the top bin.
        """
        e = self.edges
        idx = np.searchsorted(e[1:-1], v, side="right")
        if e[0] < e[-1]:
            idx = np.where(v <= e[0], 0, idx)
        return idx

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Conditioning values ``float64`` in [0, 1] of the same shape as ``values``; NaN → NaN."""
        v = np.asarray(values, dtype=np.float64)
        idx = self._index(v)
        out = idx.astype(np.float64) / float(self.num_bins - 1)
        return np.where(np.isnan(v), np.nan, out)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RewardBins):
            return NotImplemented
        return (
            self.name == other.name
            and self.version == other.version
            and self.n == other.n
            and np.array_equal(self.edges, other.edges)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like a regular dataclass with eq


def edges_hash(rewards: Mapping[str, RewardBins]) -> str:
    """sha256 hex of the canonical JSON ``{name: [edges...]}`` (sorted keys, compact, no NaN)."""
    canon = {name: [float(e) for e in rb.edges] for name, rb in rewards.items()}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class BinSet:
    """Bins for several rewards sharing one ``num_bins``.

    ``rewards`` keeps its insertion order; that order is the column order of :meth:`transform`.
    """

    num_bins: int
    rewards: dict[str, RewardBins] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, (int, np.integer)):
            raise BinsFormatError(f"num_bins: expected an int, got {self.num_bins!r}")
        self.num_bins = int(self.num_bins)
        if self.num_bins < 2:
            raise BinsFormatError(f"num_bins: must be >= 2, got {self.num_bins}")
        for key, rb in self.rewards.items():
            if not isinstance(rb, RewardBins):
                raise BinsFormatError(f"rewards.{key}: expected RewardBins, got {type(rb).__name__}")
            if rb.name != key:
                raise BinsFormatError(f"rewards.{key}: name mismatch (RewardBins.name={rb.name!r})")
            if rb.num_bins != self.num_bins:
                raise BinsFormatError(f"rewards.{key}.edges: expected {self.num_bins + 1} edges, got {rb.num_bins + 1}")

    @property
    def names(self) -> list[str]:
        """Reward names in column order."""
        return list(self.rewards)

    @property
    def hash(self) -> str:
        """Content hash of the edges (see :func:`edges_hash`)."""
        return edges_hash(self.rewards)

    def _get(self, name: str) -> RewardBins:
        try:
            return self.rewards[name]
        except KeyError:
            raise KeyError(f"unknown reward {name!r}; bins exist for: {', '.join(self.rewards) or '(none)'}") from None

    def transform_one(self, name: str, values: np.ndarray) -> np.ndarray:
        """Conditioning values of reward ``name``: same shape as ``values``, float64, NaN → NaN."""
        return self._get(name).transform(values)

    def transform(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Conditioning matrix ``[N, R]`` float64 with columns in ``self.rewards`` order.

        Args:
            values: reward name → raw (normalised) scores ``[N]``. Every reward of the bin set
                must be present (a missing key is a ``KeyError`` naming it); extra keys are
                ignored. Absent scores are NaN and stay NaN.
        """
        missing = [n for n in self.rewards if n not in values]
        if missing:
            raise KeyError(f"transform: no values for reward(s) {missing}; got {sorted(values)}")
        cols: list[np.ndarray] = []
        n_rows: int | None = None
        for name, rb in self.rewards.items():
            v = np.asarray(values[name], dtype=np.float64)
            if v.ndim != 1:
                raise ValueError(f"transform: values[{name!r}] must be 1-D [N], got shape {v.shape}")
            if n_rows is None:
                n_rows = v.shape[0]
            elif v.shape[0] != n_rows:
                raise ValueError(f"transform: values[{name!r}] has {v.shape[0]} rows, expected {n_rows}")
            cols.append(rb.transform(v))
        if not cols:
            return np.zeros((0, 0), dtype=np.float64)
        return np.stack(cols, axis=1)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (schema in the module docstring)."""
        return {
            "version": BINS_FORMAT_VERSION,
            "num_bins": self.num_bins,
            "rewards": {
                name: {"edges": [float(e) for e in rb.edges], "n": rb.n, "version": rb.version}
                for name, rb in self.rewards.items()
            },
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, d: Any) -> BinSet:
        """Parse and validate a document from :meth:`to_json`.

        Raises:
            BinsFormatError: naming the offending key (e.g. ``rewards.aesthetic.edges``), or a
                hash mismatch.
        """
        if not isinstance(d, dict):
            raise BinsFormatError(f"top level: expected an object, got {type(d).__name__}")
        known = {"version", "num_bins", "rewards", "hash"}
        extra = sorted(set(d) - known)
        if extra:
            raise BinsFormatError(f"unknown key(s) {extra}; expected {sorted(known)}")
        for key in ("version", "num_bins", "rewards"):
            if key not in d:
                raise BinsFormatError(f"missing key {key!r}")
        if d["version"] != BINS_FORMAT_VERSION:
            raise BinsFormatError(f"version: unsupported bins format {d['version']!r} (expected {BINS_FORMAT_VERSION})")
        num_bins = d["num_bins"]
        if isinstance(num_bins, bool) or not isinstance(num_bins, int):
            raise BinsFormatError(f"num_bins: expected an int, got {num_bins!r}")
        raw_rewards = d["rewards"]
        if not isinstance(raw_rewards, dict):
            raise BinsFormatError(f"rewards: expected an object, got {type(raw_rewards).__name__}")
        rewards: dict[str, RewardBins] = {}
        for name, entry in raw_rewards.items():
            where = f"rewards.{name}"
            if not isinstance(entry, dict):
                raise BinsFormatError(f"{where}: expected an object, got {type(entry).__name__}")
            for key in ("edges", "n", "version"):
                if key not in entry:
                    raise BinsFormatError(f"{where}: missing key {key!r}")
            extra = sorted(set(entry) - {"edges", "n", "version"})
            if extra:
                raise BinsFormatError(f"{where}: unknown key(s) {extra}")
            edges = entry["edges"]
            if not isinstance(edges, list) or not all(
                isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges
            ):
                raise BinsFormatError(f"{where}.edges: expected a list of numbers")
            rewards[name] = RewardBins(
                name=name,
                edges=np.asarray(edges, dtype=np.float64),
                version=entry["version"],
                n=entry["n"],
            )
        binset = cls(num_bins=num_bins, rewards=rewards)
        if "hash" in d:
            if d["hash"] != binset.hash:
                raise BinsFormatError(
                    f"hash: stored {d['hash']!r} does not match the edges ({binset.hash!r}); "
                    "the file was edited or corrupted"
                )
        return binset


def _fit_one(name: str, values: np.ndarray, num_bins: int, max_samples: int, seed: int, version: str) -> RewardBins:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.any(np.isinf(v)):
        raise BinFitError(f"reward {name!r}: values contain ±inf; scores must be finite or NaN")
    finite = v[~np.isnan(v)]
    if finite.size == 0:
        raise BinFitError(
            f"reward {name!r}: no finite values to fit bins on ({v.size} values, all NaN); "
            "did its scorer fail on every sample?"
        )
    if finite.size > max_samples:
        idx = np.random.default_rng(seed).choice(finite.size, max_samples, replace=False)
        finite = finite[idx]
    edges = np.quantile(finite, np.linspace(0.0, 1.0, num_bins + 1))
    edges = np.maximum.accumulate(edges)
    return RewardBins(name=name, edges=edges, version=version, n=int(finite.size))


def fit_bins(
    values: Mapping[str, np.ndarray],
    num_bins: int = 64,
    max_samples: int = 100_000,
    seed: int = 0,
    versions: Mapping[str, str] | None = None,
) -> BinSet:
    """Fit quantile bins for every reward.

    Args:
        values: reward name → scores ``[N_r]`` (any length per reward; NaN = absent, ignored).
        num_bins: bins per reward (>= 2).
        max_samples: at most this many finite values per reward are used (seeded uniform
            subsample without replacement when there are more).
        seed: subsampling seed (same for every reward).
        versions: reward name → reward-model version recorded in the file ("" when missing).

    Returns:
        A :class:`BinSet` with rewards in the order of ``values``.

    Raises:
        BinFitError: bad arguments, or a reward with no finite values / with ±inf (names it).
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise BinFitError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise BinFitError(f"max_samples must be a positive int, got {max_samples!r}")
    if not values:
        raise BinFitError("fit_bins: no rewards given")
    versions = dict(versions or {})
    unknown = sorted(set(versions) - set(values))
    if unknown:
        raise BinFitError(f"versions given for unknown reward(s) {unknown}")
    rewards = {
        name: _fit_one(name, v, num_bins, max_samples, seed, versions.get(name, "")) for name, v in values.items()
    }
    return BinSet(num_bins=num_bins, rewards=rewards)


def save_bins(binset: BinSet, path: str | os.PathLike[str]) -> Path:
    """Write ``binset.to_json()`` to a local file atomically (temp file + rename); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(binset.to_json(), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def load_bins(path: str | os.PathLike[str]) -> BinSet:
    """Read a bins JSON file.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        BinsFormatError: invalid JSON or schema; the message starts with the file path and names
            the bad key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"bins file not found: {p}") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BinsFormatError(f"{p}: invalid JSON: {exc}") from None
    except ValueError as exc:
        raise BinsFormatError(f"{p}: {exc}") from None
    try:
        return BinSet.from_json(doc)
    except BinsFormatError as exc:
        raise BinsFormatError(f"{p}: {exc}") from None


def _reject_constant(name: str) -> float:
    """``json.loads`` hook: NaN/Infinity are not valid edges."""
    raise ValueError(f"non-finite number {name} is not allowed")
