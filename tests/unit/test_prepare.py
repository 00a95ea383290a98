"""Stage prepare: deterministic shards, resumable, manifest contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miroflow.config import Params, load_params
from miroflow.data.shards import iter_shard, read_manifest
from miroflow.prepare import run_prepare
from miroflow.storage import Storage


def _params(tmp: Path, *extra: str) -> Params:
    return load_params(
        None,
        [
            f"storage.root={tmp / 'store'}",
            f"data.manifest={tmp / 'manifests' / 'shards.json'}",
            "data.num_samples=50",
            "data.shard_size=20",
            *extra,
        ],
    )


def _shas(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def test_same_seed_identical_other_seed_different(tmp_path: Path) -> None:
    a = run_prepare(_params(tmp_path / "a"))
    b = run_prepare(_params(tmp_path / "b"))
    c = run_prepare(_params(tmp_path / "c", "data.seed=1"))
    assert [s["n"] for s in a["shards"]] == [20, 20, 10]
    assert _shas(a) == _shas(b)
    assert all(x != y for x, y in zip(_shas(a), _shas(c)))
    on_disk = read_manifest(tmp_path / "a" / "manifests" / "shards.json")
    assert _shas(on_disk) == _shas(a) and on_disk["num_samples"] == 50


def test_shards_hold_images_captions_and_scene_json(tmp_path: Path) -> None:
    m = run_prepare(_params(tmp_path, "data.synthetic_captions=true"))
    records = list(iter_shard(m["shards"][0]["uri"], Storage()))
    assert len(records) == 20
    r = records[0]
    assert r["image_ext"] == "png" and r["txt"]
    meta = r["json"]
    assert {"scene", "degradations", "swapped", "captions"} <= set(meta)
    assert meta["captions"]["original"] == r["txt"]


def test_resume_skips_finished_shards(tmp_path: Path) -> None:
    params = _params(tmp_path)
    first = run_prepare(params)
    shard0 = Path(first["shards"][0]["uri"])
    mtime = shard0.stat().st_mtime_ns
    Path(first["shards"][2]["uri"]).unlink()  # simulate a run killed before the last shard
    second = run_prepare(params)
    assert shard0.stat().st_mtime_ns == mtime, "a finished shard was rewritten"
    assert _shas(second) == _shas(first)


def test_import_domain_requires_uri(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.import_uri"):
        run_prepare(_params(tmp_path, "data.domain=import"))


def test_manifest_is_stable_json(tmp_path: Path) -> None:
    run_prepare(_params(tmp_path))
    text = (tmp_path / "manifests" / "shards.json").read_text()
    assert json.loads(text)["domain"] == "shapes"
