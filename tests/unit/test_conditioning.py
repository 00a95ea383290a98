"""Tests for miroflow.conditioning: quantile bins, mapping to conditioning values, JSON I/O."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from miroflow.conditioning import (
    BinFitError,
    BinSet,
    BinsFormatError,
    RewardBins,
    fit_bins,
    load_bins,
    save_bins,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_fit_shapes_and_endpoints() -> None:
    x = _rng().normal(size=5000)
    bs = fit_bins({"a": x, "b": x * 2 + 1}, num_bins=64, versions={"a": "v1"})
    assert bs.num_bins == 64 and bs.names == ["a", "b"]
    ra = bs.rewards["a"]
    assert ra.edges.shape == (65,) and ra.edges.dtype == np.float64
    assert ra.edges[0] == x.min() and ra.edges[-1] == x.max()
    assert np.all(np.diff(ra.edges) >= 0)
    assert ra.n == 5000 and ra.version == "v1" and bs.rewards["b"].version == ""


def test_exact_mapping_rule() -> None:
    # Hand-built edges: interior edges are 1, 2, 3 -> 4 bins, cond = idx / 3.
    rb = RewardBins(name="r", edges=np.array([0.0, 1.0, 2.0, 3.0, 4.0]), version="", n=10)
    v = np.array([-5.0, 0.0, 0.999, 1.0, 1.5, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_array_equal(rb.bin_index(v), [0, 0, 0, 1, 1, 2, 3, 3, 3])
    np.testing.assert_array_equal(rb.transform(v), np.array([0, 0, 0, 1, 1, 2, 3, 3, 3]) / 3.0)
    out = rb.transform(np.array([-np.inf, np.inf]))
    np.testing.assert_array_equal(out, [0.0, 1.0])


def test_balanced_on_continuous_data() -> None:
    n, k = 64_000, 64
    x = _rng(1).uniform(size=n)
    bs = fit_bins({"u": x}, num_bins=k, max_samples=n)
    idx = bs.rewards["u"].bin_index(x)
    counts = np.bincount(idx, minlength=k)
    assert counts.shape == (k,)
    # Fitted on the same data: each bin holds N/k up to edge rounding.
    assert np.all(np.abs(counts - n / k) <= 2), counts
    # Fresh data from the same distribution: within a few binomial standard deviations.
    y = _rng(2).uniform(size=n)
    c2 = np.bincount(bs.rewards["u"].bin_index(y), minlength=k)
    sd = np.sqrt(n / k)
    assert np.all(np.abs(c2 - n / k) < 5 * sd), c2
    # Conditioning values hit the whole k/(k-1) grid.
    cond = bs.transform_one("u", x)
    np.testing.assert_allclose(np.unique(cond), np.arange(k) / (k - 1))


def test_monotone_property_random() -> None:
    rng = _rng(3)
    for trial in range(20):
        # Mixture of continuous values and heavy ties.
        data = np.concatenate([rng.normal(size=500), np.round(rng.normal(size=500), 1), np.full(200, 0.3)])
        bs = fit_bins({"r": data}, num_bins=int(rng.integers(2, 70)), seed=trial)
        probe = np.sort(np.concatenate([rng.normal(scale=3, size=2000), data]))
        cond = bs.transform_one("r", probe)
        assert np.all(np.isfinite(cond))
        assert np.all(np.diff(cond) >= 0)
        assert cond.min() >= 0.0 and cond.max() <= 1.0


def test_ties_share_a_bin_and_mapping_is_monotone() -> None:
    # 70% of the mass at exactly 0.5: many duplicate edges.
    rng = _rng(4)
    data = np.concatenate([np.full(7000, 0.5), rng.uniform(0, 1, size=3000)])
    bs = fit_bins({"r": data}, num_bins=64)
    edges = bs.rewards["r"].edges
    assert np.sum(edges == 0.5) > 10  # duplicates really occur
    cond = bs.transform_one("r", data)
    assert len(np.unique(cond[data == 0.5])) == 1  # equal values share a bin
    # side="right": the tied value goes to the bin above every edge equal to it.
    expected_idx = int(np.sum(edges[1:-1] <= 0.5))
    assert cond[0] == expected_idx / 63
    grid = np.linspace(-0.1, 1.1, 5001)
    assert np.all(np.diff(bs.transform_one("r", grid)) >= 0)
    assert bs.transform_one("r", np.array([0.5 - 1e-12]))[0] < cond[0]


def test_constant_column() -> None:
    bs = fit_bins({"c": np.full(1000, 3.25)}, num_bins=64)
    edges = bs.rewards["c"].edges
    assert np.all(edges == 3.25)
    with np.errstate(all="raise"):  # no division by zero or invalid ops anywhere
        out = bs.transform_one("c", np.full(10, 3.25))
        below_above = bs.transform_one("c", np.array([3.0, 4.0, np.nan]))
    assert np.all(out == 1.0)  # documented: the constant lands in the top bin
    assert below_above[0] == 0.0 and below_above[1] == 1.0 and np.isnan(below_above[2])


def test_nan_in_nan_out_and_ignored_for_fitting() -> None:
    rng = _rng(5)
    x = rng.normal(size=2000)
    with_nan = x.copy()
    with_nan[::3] = np.nan
    bs = fit_bins({"r": with_nan})
    bs_clean = fit_bins({"r": with_nan[~np.isnan(with_nan)]})
    np.testing.assert_array_equal(bs.rewards["r"].edges, bs_clean.rewards["r"].edges)
    assert bs.rewards["r"].n == int(np.sum(~np.isnan(with_nan)))
    out = bs.transform_one("r", with_nan)
    assert np.all(np.isnan(out[::3]))
    assert not np.any(np.isnan(np.delete(out, np.arange(0, 2000, 3))))
    assert not np.any(out[::3] == 0)  # never 0 for absent


def test_all_nan_column_is_a_clear_error() -> None:
    with pytest.raises(BinFitError, match="'pickscore'"):
        fit_bins({"aesthetic": np.arange(10.0), "pickscore": np.full(10, np.nan)})
    with pytest.raises(BinFitError, match="'empty'"):
        fit_bins({"empty": np.array([])})
    with pytest.raises(BinFitError, match="inf"):
        fit_bins({"r": np.array([0.0, np.inf, 1.0])})


def test_bad_arguments() -> None:
    with pytest.raises(BinFitError):
        fit_bins({"r": np.arange(10.0)}, num_bins=1)
    with pytest.raises(BinFitError):
        fit_bins({"r": np.arange(10.0)}, max_samples=0)
    with pytest.raises(BinFitError, match="nope"):
        fit_bins({"r": np.arange(10.0)}, versions={"nope": "1"})
    with pytest.raises(BinFitError):
        fit_bins({})


def test_max_samples_uses_exactly_max_samples() -> None:
    x = _rng(6).permutation(np.arange(10_000, dtype=np.float64))  # distinct values
    bs = fit_bins({"r": x}, num_bins=2, max_samples=3, seed=11)
    rb = bs.rewards["r"]
    assert rb.n == 3
    # With 2 bins and 3 samples the edges are min, median, max of the subsample:
    # three distinct data values means exactly 3 distinct samples (no replacement).
    assert len(set(rb.edges.tolist())) == 3
    assert set(rb.edges.tolist()) <= set(x.tolist())
    # Documented algorithm, reproduced.
    idx = np.random.default_rng(11).choice(x.size, 3, replace=False)
    np.testing.assert_array_equal(rb.edges, np.quantile(x[idx], [0.0, 0.5, 1.0]))


def test_subsample_is_seeded_and_nan_aware() -> None:
    x = _rng(7).normal(size=50_000)
    x[::2] = np.nan
    a = fit_bins({"r": x}, max_samples=1000, seed=0)
    b = fit_bins({"r": x}, max_samples=1000, seed=0)
    c = fit_bins({"r": x}, max_samples=1000, seed=1)
    assert a.rewards["r"].n == 1000
    np.testing.assert_array_equal(a.rewards["r"].edges, b.rewards["r"].edges)
    assert not np.array_equal(a.rewards["r"].edges, c.rewards["r"].edges)
    # Fewer finite values than max_samples: all of them, no subsampling.
    d = fit_bins({"r": x}, max_samples=100_000)
    assert d.rewards["r"].n == 25_000
    # Reward order does not change a reward's edges (same seed per reward).
    e = fit_bins({"z": x[::-1].copy(), "r": x}, max_samples=1000, seed=0)
    np.testing.assert_array_equal(e.rewards["r"].edges, a.rewards["r"].edges)


def test_transform_matrix_order_and_errors() -> None:
    rng = _rng(8)
    bs = fit_bins({"b": rng.normal(size=300), "a": rng.uniform(size=300)}, num_bins=8)
    vals = {"a": np.array([0.1, np.nan, 0.9]), "b": np.array([-3.0, 0.0, 3.0]), "extra": np.zeros(3)}
    m = bs.transform(vals)
    assert m.shape == (3, 2) and m.dtype == np.float64
    np.testing.assert_array_equal(m[:, 0], bs.transform_one("b", vals["b"]))
    np.testing.assert_array_equal(m[:, 1], bs.transform_one("a", vals["a"]))
    assert np.isnan(m[1, 1]) and m[0, 0] == 0.0 and m[2, 0] == 1.0
    with pytest.raises(KeyError, match="'a'"):
        bs.transform({"b": vals["b"]})
    with pytest.raises(ValueError, match="rows"):
        bs.transform({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(KeyError, match="bins exist for: b, a"):
        bs.transform_one("zzz", np.zeros(2))


def test_json_roundtrip_and_hash(tmp_path: Path) -> None:
    rng = _rng(9)
    bs = fit_bins(
        {"aesthetic": rng.normal(size=1000), "clip": rng.uniform(size=1000)},
        num_bins=64,
        versions={"aesthetic": "laion-v2", "clip": "jina-v2"},
    )
    doc = bs.to_json()
    assert doc["version"] == 1 and doc["num_bins"] == 64
    assert len(doc["rewards"]["aesthetic"]["edges"]) == 65
    assert doc["rewards"]["clip"] == {"edges": doc["rewards"]["clip"]["edges"], "n": 1000, "version": "jina-v2"}
    assert isinstance(doc["hash"], str) and len(doc["hash"]) == 64
    json.dumps(doc, allow_nan=False)  # plain JSON
    back = BinSet.from_json(json.loads(json.dumps(doc)))
    assert back.names == bs.names
    for name in bs.names:
        assert back.rewards[name] == bs.rewards[name]  # bit-exact edges
    assert back.hash == bs.hash

    # Hash depends on edges, not on order / n / version.
    reordered = BinSet(64, {"clip": bs.rewards["clip"], "aesthetic": bs.rewards["aesthetic"]})
    assert reordered.hash == bs.hash
    changed = bs.rewards["clip"].edges.copy()
    changed[10] = np.nextafter(changed[10], -np.inf)
    other = BinSet(64, {"aesthetic": bs.rewards["aesthetic"], "clip": RewardBins("clip", changed, "jina-v2", 1000)})
    assert other.hash != bs.hash

    path = save_bins(bs, tmp_path / "sub" / "bins.json")
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    loaded = load_bins(path)
    assert loaded.to_json() == doc
    x = rng.normal(size=100)
    np.testing.assert_array_equal(loaded.transform_one("aesthetic", x), bs.transform_one("aesthetic", x))


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    return p


def test_load_errors_name_file_and_key(tmp_path: Path) -> None:
    bs = fit_bins({"aesthetic": _rng(10).normal(size=200)}, num_bins=4)
    good = bs.to_json()

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_bins(tmp_path / "missing.json")

    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(BinsFormatError, match="bad.json.*invalid JSON"):
        load_bins(p)

    doc = json.loads(json.dumps(good))
    doc["rewards"]["aesthetic"]["edges"] = doc["rewards"]["aesthetic"]["edges"][:-1]
    del doc["hash"]
    with pytest.raises(BinsFormatError, match=r"bad.json.*rewards\.aesthetic\.edges"):
        load_bins(_write(tmp_path, doc))

    doc = json.loads(json.dumps(good))
    del doc["rewards"]["aesthetic"]["n"]
    with pytest.raises(BinsFormatError, match=r"rewards\.aesthetic.*'n'"):
        load_bins(_write(tmp_path, doc))

    doc = json.loads(json.dumps(good))
    doc["rewards"]["aesthetic"]["edges"][-1] += 1.0  # still valid edges, but edited
    with pytest.raises(BinsFormatError, match="bad.json: hash"):
        load_bins(_write(tmp_path, doc))
    del doc["hash"]
    assert (
        load_bins(_write(tmp_path, doc)).rewards["aesthetic"].edges[-1] == doc["rewards"]["aesthetic"]["edges"][-1]
    )  # the hash is optional on input
    doc["rewards"]["aesthetic"]["edges"][2] = doc["rewards"]["aesthetic"]["edges"][0] - 1.0
    with pytest.raises(BinsFormatError, match="non-decreasing"):
        load_bins(_write(tmp_path, doc))

    doc = json.loads(json.dumps(good))
    doc["bogus"] = 1
    with pytest.raises(BinsFormatError, match="bogus"):
        load_bins(_write(tmp_path, doc))

    doc = json.loads(json.dumps(good))
    doc["version"] = 2
    with pytest.raises(BinsFormatError, match="version"):
        load_bins(_write(tmp_path, doc))

    p.write_text(json.dumps(good).replace(str(good["rewards"]["aesthetic"]["edges"][1]), "NaN", 1))
    with pytest.raises(BinsFormatError, match="bad.json"):
        load_bins(p)


def test_edges_are_read_only_copies() -> None:
    src = np.array([0.0, 1.0, 2.0])
    rb = RewardBins("r", src, "", 3)
    src[0] = 99.0
    assert rb.edges[0] == 0.0
    with pytest.raises(ValueError):
        rb.edges[0] = 5.0
    with pytest.raises(BinsFormatError, match="edges"):
        BinSet(3, {"r": rb})  # 3 edges = 2 bins, not 3


def test_piled_up_extremes_map_to_zero_and_one_for_every_reward() -> None:
    """Ties at the minimum go to bin 0 and ties at the maximum to the top bin (docs/design.md §3), so
    the targets 0 and 1 are training values; fails on the old rule (``side="right"`` everywhere gave
    the 12% zeros 7/63)."""
    rng = _rng(5)
    n = 10_000
    rewards: dict[str, np.ndarray] = {}
    for j, (lo_frac, hi_frac) in enumerate([(0.12, 0.0), (0.03, 0.05), (0.0, 0.2), (0.3, 0.3)]):
        v = rng.uniform(0.1, 0.9, size=n)
        u = rng.uniform(size=n)
        v[u < lo_frac] = 0.0
        v[u > 1 - hi_frac] = 1.0
        rewards[f"r{j}"] = v
    bs = fit_bins(rewards, num_bins=64)
    cond = bs.transform(rewards)
    for j, (name, v) in enumerate(rewards.items()):
        edges = bs.rewards[name].edges
        c = cond[:, j]
        at_min, at_max = v == edges[0], v == edges[-1]
        assert at_min.any() and at_max.any()
        assert np.all(c[at_min] == 0.0), (name, np.unique(c[at_min]))
        assert np.all(c[at_max] == 1.0), (name, np.unique(c[at_max]))
        assert np.all(bs.rewards[name].bin_index(v[at_min]) == 0)
        assert np.all(np.diff(bs.transform_one(name, np.sort(v))) >= 0)  # still monotone
    # 12% exact zeros: seven interior edges sit at 0; the zeros still get the value 0.
    assert np.sum(bs.rewards["r0"].edges[1:-1] == 0.0) == 7 and np.all(cond[rewards["r0"] == 0.0, 0] == 0.0)
    # Values just above the pile keep today's rule: the bin above every edge equal to 0.
    assert bs.transform_one("r0", np.array([1e-9]))[0] == 7 / 63
