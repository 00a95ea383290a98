"""MiroDenoiser (diffusers SD3Transformer2DModel) and RewardEmbedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from miroflow.models.denoiser import (
    MODEL_SIZES,
    DenoiserConfig,
    MiroDenoiser,
    count_params,
    create_denoiser,
)
from miroflow.models.reward_embedding import RewardEmbedder

REWARDS = ["sharpness", "noise", "contrast", "compressibility", "shapes_alignment"]
B, L, DT = 4, 12, 48


def _inputs(b: int = B, r: int = len(REWARDS), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i in range(b):
        mask[i, : 3 + i] = True
    rewards = torch.rand(b, r, generator=g)
    if r:
        rewards[0, 0] = float("nan")
        rewards[1] = float("nan")
    return dict(
        x_t=torch.randn(b, 3, 32, 32, generator=g),
        t=torch.rand(b, generator=g),
        text_tokens=torch.randn(b, L, DT, generator=g),
        text_mask=mask,
        pooled=torch.randn(b, DT, generator=g),
        rewards=rewards,
    )


def _perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Leave the zero-init state so outputs depend on every input (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _tiny(rewards: list[str] = REWARDS, **kw: object) -> MiroDenoiser:
    torch.manual_seed(0)
    return create_denoiser("tiny", rewards, text_dim=DT, pooled_dim=DT, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- denoiser
def test_tiny_forward_shape_and_zero_init() -> None:
    model = _tiny()
    assert 300_000 <= count_params(model.backbone) <= 500_000
    inp = _inputs()
    v = model(**inp)
    assert v.shape == (B, 3, 32, 32) and v.dtype == torch.float32
    assert torch.all(v == 0)  # DiT init: zero adaLN + zero output projection
    _perturb(model)
    v = model(**inp)
    assert torch.isfinite(v).all() and v.abs().mean() > 0


def test_fresh_miro_equals_baseline_and_gradients_reach_rewards() -> None:
    base, miro = _tiny([]), _tiny()
    _perturb(base)
    miro.backbone.load_state_dict(base.backbone.state_dict())
    inp = _inputs()
    base_inp = dict(inp, rewards=torch.empty(B, 0))
    torch.testing.assert_close(miro(**inp), base(**base_inp), atol=0, rtol=0)
    loss = miro(**inp).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in miro.reward_embedder.named_parameters()}
    assert grads["w2"] is not None and grads["w2"].abs().sum() > 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_baseline_has_no_reward_parameters() -> None:
    base = _tiny([])
    assert count_params(base) == count_params(base.backbone)
    assert not any(k.startswith("reward_embedder") for k in base.state_dict())
    inp = _inputs(r=0)
    assert base(**inp).shape == (B, 3, 32, 32)
    assert base(**dict(inp, rewards=None)).shape == (B, 3, 32, 32)


def test_save_load_round_trip_bit_exact(tmp_path: Path) -> None:
    model = _tiny()
    _perturb(model)
    model.eval()
    inp = _inputs()
    with torch.no_grad():
        ref = model(**inp)
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["reward_names"] == REWARDS and cfg["size"] == "tiny" and cfg["backbone"] == "sd3"
    loaded = MiroDenoiser.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(**inp), ref)


def test_padded_text_is_masked_out_of_attention() -> None:
    model = _tiny()
    _perturb(model)
    inp = _inputs()
    inp["text_mask"] = torch.zeros(B, L, dtype=torch.bool)
    inp["text_mask"][:, :5] = True
    with torch.no_grad():
        padded = model(**inp)
        short = model(**dict(inp, text_tokens=inp["text_tokens"][:, :5], text_mask=inp["text_mask"][:, :5]))
        garbage = model(**dict(inp, text_tokens=torch.where(inp["text_mask"][..., None], inp["text_tokens"], 1e3)))
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-4)
    assert torch.equal(padded, garbage)


def test_rewards_change_output_and_nan_means_absent() -> None:
    model = _tiny()
    _perturb(model)
    inp = _inputs()
    with torch.no_grad():
        hi = model(**dict(inp, rewards=torch.ones(B, 5)))
        lo = model(**dict(inp, rewards=torch.zeros(B, 5)))
        absent = model(**dict(inp, rewards=torch.full((B, 5), float("nan"))))
        none = model(**dict(inp, rewards=None))
    assert (hi - lo).abs().max() > 1e-4 and (absent - lo).abs().max() > 1e-4
    assert torch.equal(absent, none)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("x_t", torch.randn(B, 4, 32, 32)),
        ("x_t", torch.randn(B, 3, 30, 30)),
        ("t", torch.rand(B + 1)),
        ("text_tokens", torch.randn(B, L, DT + 1)),
        ("text_mask", torch.ones(B, L + 1, dtype=torch.bool)),
        ("pooled", torch.randn(B, 7)),
        ("rewards", torch.rand(B, 2)),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_tensor(name: str, bad: torch.Tensor) -> None:
    model = _tiny()
    with pytest.raises(ValueError, match=rf"^{name} "):
        model(**dict(_inputs(), **{name: bad}))


def test_unknown_size_lists_valid() -> None:
    with pytest.raises(ValueError, match="tiny, small, paper"):
        create_denoiser("huge", [])
    with pytest.raises(ValueError, match="divisible"):
        DenoiserConfig(sample_size=30, patch_size=4)


def test_paper_size_param_count_on_meta_device() -> None:
    with torch.device("meta"):
        model = create_denoiser("paper", [f"r{i}" for i in range(7)], text_dim=2048, pooled_dim=2048)
    assert next(model.parameters()).device.type == "meta"
    n = count_params(model)
    assert 300_000_000 <= n <= 420_000_000, n
    assert model.config.in_channels == 4 and model.config.sample_size == 32 and model.config.width == 1024
    assert set(MODEL_SIZES) == {"tiny", "small", "paper"}


# ------------------------------------------------------------------------ reward embedder
def _embedder(zero_init: bool = False) -> RewardEmbedder:
    torch.manual_seed(0)
    return RewardEmbedder(["a", "b", "c"], dim=16, num_frequencies=8, zero_init=zero_init)


def test_reward_nan_selects_null_embedding() -> None:
    emb = _embedder()
    values = torch.tensor([[0.5, float("nan"), 1.0], [float("nan"), float("nan"), float("nan")]])
    tok = emb.tokens(values)
    assert tok.shape == (2, 3, 16)
    torch.testing.assert_close(tok[0, 1], emb.null[1] + emb.pos[1])
    torch.testing.assert_close(tok[1], emb.null + emb.pos)
    torch.testing.assert_close(emb(values), tok.mean(dim=1))
    assert not torch.allclose(tok[0, 0], emb.null[0] + emb.pos[0])


def test_reward_values_distinguish_and_are_deterministic() -> None:
    emb = _embedder()
    grid = torch.arange(64, dtype=torch.float32).div(63).unsqueeze(1).repeat(1, 3)
    out = emb(grid)
    assert torch.equal(out, emb(grid.clone()))
    dists = torch.cdist(out, out) + torch.eye(64) * 1e9
    assert dists.min() > 1e-4  # every bin value maps to a distinct embedding
    zero = torch.zeros(1, 3)
    assert not torch.allclose(emb(zero), emb(torch.full((1, 3), float("nan"))))


@pytest.mark.parametrize("zero_init", [False, True])
def test_reward_gradients_flow_without_nan(zero_init: bool) -> None:
    emb = _embedder(zero_init)
    values = torch.tensor([[0.2, float("nan"), 0.9], [float("nan"), 0.4, 0.0]], requires_grad=True)
    weights = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    (emb(values) * weights).sum().backward()
    for name, p in emb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert emb.w2.grad.abs().sum() > 0 and emb.null.grad.abs().sum() > 0 and emb.pos.grad.abs().sum() > 0
    assert values.grad is not None and torch.isfinite(values.grad).all()
    assert torch.all(values.grad[torch.isnan(values.detach())] == 0)


def test_reward_baseline_zero_rewards() -> None:
    emb = RewardEmbedder([], dim=16)
    assert list(emb.parameters()) == [] and emb.state_dict() == {}
    out = emb(torch.empty(3, 0))
    assert out.shape == (3, 16) and torch.all(out == 0)
    assert emb.tokens(torch.empty(3, 0)).shape == (3, 0, 16)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B, 0\]"):
        emb(torch.rand(3, 1))


def test_masked_processor_matches_diffusers_processor_without_padding() -> None:
    ours, plain = _tiny(), _tiny(mask_text=False)
    _perturb(ours)
    plain.load_state_dict(ours.state_dict())
    inp = dict(_inputs(), text_mask=torch.ones(B, L, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inp), plain(**inp), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            ours(**dict(inp, text_mask=None)), plain(**dict(inp, text_mask=None)), atol=0, rtol=0
        )
