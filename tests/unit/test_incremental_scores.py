"""Incremental rewards: a reward set reuses the columns other sets' tables hold (miroflow.score_reuse).

Reward calls are counted: adding a reward computes only its column, removing one computes nothing,
bumping one reward's version rescores that reward alone, and every table equals the one scoring
from scratch would write. Bins are fitted only for rewards whose inputs changed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from miroflow.config import Params
from miroflow.content_keys import stage_hash
from miroflow.data.score_tables import load_score_table
from miroflow.prepare import run_prepare
from miroflow.rewards import clear_reward_cache, register_reward
from miroflow.score import run_bin, run_score
from miroflow.score_reuse import REGISTRY_NAME
from miroflow.storage import sha256_bytes

TAG = uuid.uuid4().hex[:8]
A, B, C, D = (f"inc_{x}_{TAG}" for x in "abcd")
D_VERSION = {"v": "d-v1"}  # the dynamic version of reward D (declared None in the registry)


class _Counting:
    """Image reward ``mean(images * weight) [B]``; counts the images it scores per class."""

    name = ""
    version = ""
    uses_prompt = False
    weight = 1.0
    scored: ClassVar[dict[str, int]] = {}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` mean intensity times ``weight`` of ``images [B, 3, H, W]``."""
        type(self).scored[self.name] = type(self).scored.get(self.name, 0) + images.shape[0]
        return (images * self.weight).mean(dim=(1, 2, 3)).float()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return raw.float()


class _Prompted(_Counting):
    """Prompt-dependent: ``len(prompt) / 100`` (gets ``@synthetic`` columns too)."""

    uses_prompt = True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` caption lengths / 100."""
        type(self).scored[self.name] = type(self).scored.get(self.name, 0) + images.shape[0]
        return torch.tensor([len(p) / 100.0 for p in prompts])


def _make(cls: type[_Counting], name: str, version: str, weight: float) -> _Counting:
    r = cls()
    r.name, r.version, r.weight = name, version, weight
    return r


@register_reward(A, needs_weights=False, version="a-v1")
def _a(**kwargs: Any) -> _Counting:
    return _make(_Counting, A, "a-v1", 1.0)


@register_reward(B, needs_weights=False, version="b-v1")
def _b(**kwargs: Any) -> _Counting:
    return _make(_Prompted, B, "b-v1", 1.0)


@register_reward(C, needs_weights=False, version="c-v1")
def _c(**kwargs: Any) -> _Counting:
    return _make(_Counting, C, "c-v1", 0.5)


@register_reward(D, needs_weights=False, version=None)
def _d(**kwargs: Any) -> _Counting:
    return _make(_Counting, D, D_VERSION["v"], 2.0 if D_VERSION["v"] == "d-v2" else 0.25)


def _params(root: Path, rewards: list[str]) -> Params:
    return Params.model_validate(
        {
            "data": {
                "num_samples": 16,
                "shard_size": 8,
                "synthetic_captions": True,
                "manifest": str(root / "m" / "shards.json"),
            },
            "score": {
                "rewards": rewards,
                "batch_size": 4,
                "device": "cpu",
                "num_bins": 4,
                "manifest": str(root / "m" / "scores.json"),
                "bins": str(root / "m" / "bins.json"),
            },
            "storage": {"root": str(root / "store")},
        }
    )


def _score(p: Params) -> tuple[dict[str, Any], dict[str, int]]:
    """Run the score stage fresh (reward cache cleared); ``(manifest, images scored per reward)``."""
    clear_reward_cache()
    _Counting.scored.clear()
    m = run_score(p)
    return m, dict(_Counting.scored)


def _tables(m: dict[str, Any]) -> list[pd.DataFrame]:
    return [load_score_table(t["uri"]) for t in m["tables"]]


def _same_tables(got: list[pd.DataFrame], want: list[pd.DataFrame]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        pd.testing.assert_frame_equal(g, w)
        assert g.attrs["miroflow"]["rewards"] == w.attrs["miroflow"]["rewards"]


@pytest.fixture(autouse=True)
def _reset_d_version() -> None:
    D_VERSION["v"] = "d-v1"


def test_adding_removing_and_versioning_rewards_scores_only_what_changed(tmp_path: Path) -> None:
    p_ab = _params(tmp_path, [A, B])
    run_prepare(p_ab)
    m_ab, calls = _score(p_ab)
    assert calls == {A: 16, B: 32}  # B also scores the 16 synthetic captions

    # add C: 0 calls for A and B, only C's column is computed
    p_abc = _params(tmp_path, [A, B, C])
    m_abc, calls = _score(p_abc)
    assert calls == {C: 16}
    assert all(t["rewards"] == {A: "a-v1", B: "b-v1", C: "c-v1"} for t in m_abc["tables"])
    for t in m_abc["tables"]:  # the manifest records each table's content hash
        assert t["sha256"] == sha256_bytes(Path(t["uri"]).read_bytes())
    fresh = tmp_path / "fresh"  # the same set scored from scratch elsewhere: identical tables
    run_prepare(_params(fresh, [A, B, C]))
    m_fresh, calls = _score(_params(fresh, [A, B, C]))
    assert calls == {A: 16, B: 32, C: 16}
    _same_tables(_tables(m_abc), _tables(m_fresh))

    # remove B: nothing is computed
    m_ac, calls = _score(_params(tmp_path, [C, A]))
    assert calls == {}
    assert list(_tables(m_ac)[0].columns) == ["key", f"{C}.raw", C, f"{A}.raw", A]  # in the order asked

    # the old tables are untouched (content-addressed folders) and rerunning skips
    _same_tables(_tables(m_ab), _tables(run_score(p_ab)))

    # a new version of one reward rescores that reward alone
    m_ad, calls = _score(_params(tmp_path, [A, D]))
    assert calls == {D: 16}
    d_v1 = _tables(m_ad)[0][D].to_numpy()
    D_VERSION["v"] = "d-v2"
    m_ad2, calls = _score(_params(tmp_path, [A, D]))
    assert calls == {D: 16}
    assert m_ad2["tables"][0]["uri"] == m_ad["tables"][0]["uri"]  # same set hash: the table is rewritten
    t2 = _tables(m_ad2)[0]
    assert t2.attrs["miroflow"]["rewards"] == {A: "a-v1", D: "d-v2"}
    np.testing.assert_allclose(t2[D].to_numpy(), 8 * d_v1, rtol=1e-6)  # weight 0.25 -> 2

    registry = json.loads((Path(m_ab["tables"][0]["uri"]).parents[1] / REGISTRY_NAME).read_text())
    assert {A: "a-v1", B: "b-v1", C: "c-v1"} in registry.values() and len(registry) == 4


def test_bins_are_fitted_only_for_rewards_whose_inputs_changed(tmp_path: Path) -> None:
    p_ab, p_abc = _params(tmp_path, [A, B]), _params(tmp_path, [A, B, C])
    run_prepare(p_ab)
    _score(p_ab)
    bins_ab = run_bin(p_ab)
    cache = Path(p_ab.storage.root) / "bins" / "reward"
    assert len(list(cache.glob("*.json"))) == 2
    _score(p_abc)
    bins_abc = run_bin(p_abc)
    assert len(list(cache.glob("*.json"))) == 3  # one new fit: C's
    for name in (A, B):
        np.testing.assert_array_equal(bins_abc.rewards[name].edges, bins_ab.rewards[name].edges)
    fresh = tmp_path / "fresh"
    run_prepare(_params(fresh, [A, B, C]))
    _score(_params(fresh, [A, B, C]))
    assert run_bin(_params(fresh, [A, B, C])).to_json() == bins_abc.to_json()  # same as fitting all at once


def test_a_damaged_donor_table_is_not_reused(tmp_path: Path) -> None:
    p_ab = _params(tmp_path, [A, B])
    run_prepare(p_ab)
    m_ab, _ = _score(p_ab)
    first = Path(m_ab["tables"][0]["uri"])
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))  # fails its hash record: never a donor
    m_abc, calls = _score(_params(tmp_path, [A, B, C]))
    assert calls == {A: 8, B: 16, C: 16}  # shard 0 fully rescored, shard 1 only C
    fresh = tmp_path / "fresh"
    run_prepare(_params(fresh, [A, B, C]))
    _same_tables(_tables(m_abc), _tables(_score(_params(fresh, [A, B, C]))[0]))


def test_an_unreadable_registry_means_no_reuse_not_a_wrong_table(tmp_path: Path) -> None:
    p_ab = _params(tmp_path, [A, B])
    run_prepare(p_ab)
    m_ab, _ = _score(p_ab)
    (Path(m_ab["tables"][0]["uri"]).parents[1] / REGISTRY_NAME).write_text("{not json")
    _, calls = _score(_params(tmp_path, [A, B, C]))
    assert calls == {A: 16, B: 32, C: 16}


def test_adding_a_reward_leaves_prepare_and_embed_keys_alone() -> None:
    base = Params()
    more = base.model_copy(update={"score": base.score.model_copy(update={"rewards": ["sharpness", "noise"]})})
    for stage in ("prepare", "embed"):
        assert stage_hash(more, stage) == stage_hash(base, stage)
    for stage in ("score", "bin", "train", "evaluate", "sweep"):
        assert stage_hash(more, stage) != stage_hash(base, stage)
