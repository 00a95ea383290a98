"""Reward-embedding feature modes (docs/fidelity.md, "Reward embedding").

New denoisers use ``grid_interp``: the embedding of any target in [0, 1] lies on the segment
between the embeddings of its two neighbours on the k/G training grid. The original ``fourier``
mode stays selectable, and a checkpoint written before the mode existed (``config.json`` without
``reward_features``, ``tests/unit/data/fourier_denoiser/``, written by the old code) loads as
``fourier`` and computes what the old code computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miroflow.checkpoint import checkpoint_architecture, expected_architecture
from miroflow.config import Params, apply_overrides
from miroflow.models.denoiser import DenoiserConfig, MiroDenoiser, create_denoiser
from miroflow.models.reward_embedding import RewardEmbedder, grid_neighbours

OLD = Path(__file__).with_name("data") / "fourier_denoiser"
G = 63
#: Off-grid targets: the study's sweep, the paper's tuned aesthetic target, and points inside a bin.
OFF_GRID = [0.25, 0.5, 0.625, 0.75, (15 + 0.3) / G, (47 + 0.8) / G, 0.999]


def _embedder(features: str, seed: int = 0) -> RewardEmbedder:
    """A randomly initialised (non-zero) 3-reward embedder, as after training."""
    torch.manual_seed(seed)
    return RewardEmbedder(["a", "b", "c"], dim=24, zero_init=False, features=features, grid=G)  # type: ignore[arg-type]


def _segment_residual(e: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    """``(distance of e from the segment [lo, hi] / |hi - lo|, position along it)`` for vectors ``[D]``."""
    d = hi - lo
    pos = float(torch.dot(e - lo, d) / torch.dot(d, d))
    closest = lo + min(1.0, max(0.0, pos)) * d
    return float((e - closest).norm() / d.norm()), pos


def _pooled_sweep(emb: RewardEmbedder, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled embeddings ``[D]`` at ``s`` and at its grid neighbours, reward ``a`` swept, the others fixed."""
    k = int(s * G)
    rows = torch.tensor([[s, 0.3, float("nan")], [k / G, 0.3, float("nan")], [(k + 1) / G, 0.3, float("nan")]])
    with torch.no_grad():
        out = emb(rows)
    return out[0], out[1], out[2]


def test_new_denoisers_embed_off_grid_targets_between_their_grid_neighbours() -> None:
    """Fails on the old code: its only (fourier) embedding puts off-grid targets off the segment."""
    model = create_denoiser("tiny", ["a", "b", "c"], text_dim=24, pooled_dim=24, num_layers=1)
    assert model.config.reward_features == "grid_interp" and model.config.reward_grid == G
    emb = model.reward_embedder
    with torch.no_grad():  # leave the zero init (a fresh model embeds every value alike)
        g = torch.Generator().manual_seed(3)
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for s in OFF_GRID:
        e, lo, hi = _pooled_sweep(emb, s)
        residual, pos = _segment_residual(e, lo, hi)
        assert residual < 1e-5 and 0.0 < pos < 1.0, (s, residual, pos)
        assert pos == pytest.approx(s * G - int(s * G), abs=1e-4)


def test_fourier_mode_puts_off_grid_targets_off_the_segment() -> None:
    """What the issue measured: the old features make an off-grid target a point the model never saw."""
    emb = _embedder("fourier")
    residuals = [_segment_residual(*_pooled_sweep(emb, s))[0] for s in OFF_GRID]
    assert min(residuals) > 0.05, residuals


def test_grid_interp_is_exact_on_the_grid_and_clamps() -> None:
    emb = _embedder("grid_interp")
    grid = torch.arange(G + 1, dtype=torch.float64).div(G).float()  # what the bins produce (float64 -> float32)
    vals = grid.unsqueeze(1).repeat(1, 3)
    with torch.no_grad():
        tok = emb.tokens(vals)
        # Each grid value gives exactly the MLP embedding of that grid value (w = 0: nothing mixed in).
        direct = emb._mlp(vals) + emb.pos.unsqueeze(0)
        assert torch.equal(tok, direct)
        assert torch.cdist(tok[:, 0], tok[:, 0]).add(torch.eye(G + 1) * 1e9).min() > 1e-4
        out = emb(torch.tensor([[1.3, -0.2, 0.5], [1.0, 0.0, 0.5]]))
    assert torch.equal(out[0], out[1])  # targets outside [0, 1] are clamped to it
    lo, hi, w = grid_neighbours(torch.tensor([0.0, 1.0, 0.5, 15 / G]), G)
    assert torch.equal(w, torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert torch.equal(lo, torch.tensor([0.0, 1.0, 31 / G, 15 / G])) and hi[1] == 1.0


@pytest.mark.parametrize("features", ["grid_interp", "fourier"])
def test_absent_rewards_and_gradients_stay_nan_free(features: str) -> None:
    emb = _embedder(features)
    values = torch.tensor([[0.25, float("nan"), 1.0], [float("nan"), 0.5, 0.0]], requires_grad=True)
    tok = emb.tokens(values)
    torch.testing.assert_close(tok[0, 1], emb.null[1] + emb.pos[1])
    torch.testing.assert_close(tok[1, 0], emb.null[0] + emb.pos[0])
    weights = torch.randn(2, 24, generator=torch.Generator().manual_seed(0))
    (emb(values) * weights).sum().backward()
    for name, p in emb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert torch.all(values.grad[torch.isnan(values.detach())] == 0)


def _old_checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "old"
    shutil.copytree(OLD, d)
    return d


def test_old_checkpoint_loads_as_fourier_and_computes_what_the_old_code_did(tmp_path: Path) -> None:
    """``fourier_denoiser/`` was written by the code before ``reward_features`` existed, with the
    inputs and outputs it computed; loading it today gives the same model and the same outputs."""
    d = _old_checkpoint(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    assert "reward_features" not in raw and "reward_grid" not in raw
    model = MiroDenoiser.from_pretrained(d).eval()
    assert model.config.reward_features == "fourier" and model.reward_embedder.features == "fourier"
    ref = load_file(str(d / "expected.safetensors"))
    inputs = {k: ref[k] for k in ("x_t", "t", "text_tokens", "text_mask", "pooled", "rewards")}
    with torch.no_grad():
        emb, v = model.reward_embedder(inputs["rewards"]), model(**inputs)
    torch.testing.assert_close(emb, ref["reward_embedding"], atol=1e-6, rtol=0)
    # the velocity goes through the whole transformer: another CPU's kernels (AVX2 vs AVX-512) sum in
    # another order, ~1e-5 apart on |v| ~ 1; a wrong embedding mode is off by ~1e-1 (checked below)
    torch.testing.assert_close(v, ref["velocity"], atol=5e-5, rtol=1e-5)
    # Bit for bit in one process: the old config and an explicit fourier config build the same function.
    explicit = MiroDenoiser(DenoiserConfig.model_validate({**raw, "reward_features": "fourier"})).eval()
    explicit.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(explicit(**inputs), v)
        # The same weights read as grid_interp would sample differently at the off-grid targets.
        interp = MiroDenoiser(DenoiserConfig.model_validate({**raw, "reward_features": "grid_interp"})).eval()
        interp.load_state_dict(model.state_dict())
        assert not torch.allclose(interp.reward_embedder(inputs["rewards"]), emb)
    # Saving it again records the mode explicitly.
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["reward_features"] == "fourier"


def test_resume_refuses_a_mismatching_reward_embedding() -> None:
    raw = json.loads((OLD / "config.json").read_text())
    old_miro = {"reward_names": raw["reward_names"], "denoiser": raw}
    have = checkpoint_architecture(old_miro)
    assert have["reward_features"] == "fourier" and have["reward_grid"] is None
    want = expected_architecture(Params(), raw["reward_names"])
    assert want["reward_features"] == "grid_interp" and want["reward_grid"] == 63
    legacy = expected_architecture(apply_overrides(Params(), ["train.reward_features=fourier"]), raw["reward_names"])
    assert (legacy["reward_features"], legacy["reward_grid"]) == ("fourier", None)
    new_miro = {"reward_names": ["a"], "denoiser": {**raw, "reward_features": "grid_interp", "reward_grid": 15}}
    assert checkpoint_architecture(new_miro)["reward_grid"] == 15
    assert expected_architecture(apply_overrides(Params(), ["score.num_bins=16"]), ["a"])["reward_grid"] == 15
    # A baseline has no reward embedding: the mode never blocks its resume.
    assert checkpoint_architecture({"reward_names": [], "denoiser": raw})["reward_features"] is None
    assert expected_architecture(Params(), [])["reward_features"] is None
