"""Tests for miroflow.flow: flow-matching math on toy data (pure, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from miroflow.flow import (
    apply_reward_dropout,
    apply_text_dropout,
    cfg_model_fn,
    euler_sample,
    flow_matching_loss,
    guided_velocity,
    interpolate,
    sample_t,
    t_bin_index,
    timesteps,
    velocity_target,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(seed: int = 0, shape: tuple[int, ...] = (4, 3, 8, 8)) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ---------------------------------------------------------------- interpolation / target


def test_interpolate_endpoints_exact() -> None:
    x, eps = _data()
    b = x.shape[0]
    assert torch.equal(interpolate(x, eps, torch.zeros(b)), x)
    assert torch.equal(interpolate(x, eps, torch.ones(b)), eps)
    assert torch.equal(interpolate(x, eps, 0.0), x)
    # Per-sample t broadcasts over [C, H, W].
    t = torch.tensor([0.0, 1.0, 0.25, 0.5])
    xt = interpolate(x, eps, t)
    assert torch.equal(xt[0], x[0]) and torch.equal(xt[1], eps[1])
    torch.testing.assert_close(xt[2], 0.75 * x[2] + 0.25 * eps[2])
    with pytest.raises(ValueError):
        interpolate(x, eps, torch.zeros(b + 1))
    with pytest.raises(ValueError):
        interpolate(x, eps[:2], 0.5)


def test_target_consistency() -> None:
    x, eps = _data(1)
    x, eps = x.double(), eps.double()
    t = torch.rand(x.shape[0], generator=_gen(2), dtype=torch.float64)
    xt = interpolate(x, eps, t)
    v = velocity_target(x, eps)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt - tt * v, x)  # step to t=0 along v recovers the data
    torch.testing.assert_close(xt + (1 - tt) * v, eps)  # step to t=1 recovers the noise
    # v is dx_t/dt.
    h = 1e-3
    torch.testing.assert_close((interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h), v)


def test_interpolate_does_not_modify_inputs() -> None:
    x, eps = _data(3)
    t = torch.rand(x.shape[0], generator=_gen(4))
    xc, ec, tc = x.clone(), eps.clone(), t.clone()
    interpolate(x, eps, t)
    velocity_target(x, eps)
    assert torch.equal(x, xc) and torch.equal(eps, ec) and torch.equal(t, tc)


# ---------------------------------------------------------------- t sampling


def test_sample_t_logit_normal() -> None:
    n = 200_000
    t = sample_t(n, generator=_gen(0))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert torch.all(t > 0) and torch.all(t < 1)
    assert abs(t.median().item() - 0.5) < 0.01
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    # Shifted / scaled.
    t2 = sample_t(n, generator=_gen(1), mean=1.0, std=0.5)
    assert abs(t2.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
    logit2 = torch.log(t2.double()) - torch.log1p(-t2.double())
    assert abs(logit2.std().item() - 0.5) < 0.02
    # Reproducible.
    assert torch.equal(sample_t(16, generator=_gen(5)), sample_t(16, generator=_gen(5)))
    assert not torch.equal(sample_t(16, generator=_gen(5)), sample_t(16, generator=_gen(6)))


# ---------------------------------------------------------------- loss


def test_flow_matching_loss_total_and_bins() -> None:
    g = _gen(7)
    b = 1000
    pred = torch.randn(b, 2, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(b, 2, 4, 4, generator=g)
    t = torch.rand(b, generator=g)
    t[:3] = torch.tensor([0.0, 1.0, 0.1])
    loss, per_bin, counts = flow_matching_loss(pred, target, t, num_bins=10)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    assert per_bin.shape == (10,) and counts.shape == (10,) and counts.dtype == torch.int64
    assert int(counts.sum()) == b
    torch.testing.assert_close((per_bin.double() * counts).sum() / b, loss.double().detach(), rtol=1e-6, atol=1e-7)
    # Per-bin means match a direct computation.
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3)).detach()
    idx = t_bin_index(t, 10)
    assert idx[0] == 0 and idx[1] == 9 and idx[2] == 1
    for k in range(10):
        sel = idx == k
        assert counts[k] == int(sel.sum())
        torch.testing.assert_close(per_bin[k], per_sample[sel].mean())
    # Loss is differentiable; metrics are not.
    loss.backward()
    assert pred.grad is not None and not per_bin.requires_grad


def test_flow_matching_loss_empty_bins() -> None:
    pred = torch.ones(4, 3)
    target = torch.zeros(4, 3)
    target[1] = 2.0  # per-sample losses: 1, 1, 1, 1
    t = torch.tensor([0.05, 0.06, 0.95, 0.99])
    loss, per_bin, counts = flow_matching_loss(pred, target, t, num_bins=10)
    assert counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert per_bin.tolist() == [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0]
    assert loss.item() == 1.0
    with pytest.raises(ValueError):
        flow_matching_loss(pred, target, t[:3])


# ---------------------------------------------------------------- dropout


def test_reward_dropout_rates() -> None:
    b, r, p_each, p_all = 200_000, 3, 0.1, 0.2
    values = torch.rand(b, r, generator=_gen(0))
    values[:10, 0] = float("nan")  # already absent
    before = values.clone()
    out = apply_reward_dropout(values, p_each, p_all, generator=_gen(1))
    assert torch.equal(values.isnan(), before.isnan())
    assert torch.equal(torch.nan_to_num(values, 9.0), torch.nan_to_num(before, 9.0))  # not in place
    assert out.shape == (b, r) and out.dtype == values.dtype
    nan = out.isnan()
    assert torch.all(nan[:10, 0])
    kept = ~nan
    assert torch.equal(out[kept], values[kept])  # survivors are untouched
    entry_rate = nan[10:].float().mean().item()
    expected_entry = 1 - (1 - p_each) * (1 - p_all)
    sd_entry = math.sqrt(expected_entry * (1 - expected_entry) / (b * r))
    assert abs(entry_rate - expected_entry) < 5 * sd_entry + 1e-3
    row_rate = nan[10:].all(dim=1).float().mean().item()
    expected_row = p_all + (1 - p_all) * p_each**r
    assert abs(row_rate - expected_row) < 5 * math.sqrt(expected_row * (1 - expected_row) / b)
    # Reproducible; p = 0 changes nothing; p_all = 1 drops everything.
    again = apply_reward_dropout(values, p_each, p_all, generator=_gen(1))
    assert torch.equal(again.isnan(), nan)
    same = apply_reward_dropout(values, 0.0, 0.0, generator=_gen(2))
    assert torch.equal(same.isnan(), values.isnan())
    assert torch.all(apply_reward_dropout(values, 0.0, 1.0, generator=_gen(3)).isnan())
    with pytest.raises(ValueError):
        apply_reward_dropout(values, 1.5, 0.0)
    with pytest.raises(TypeError):
        apply_reward_dropout(torch.zeros(2, 2, dtype=torch.long), 0.1, 0.1)


def test_text_dropout_rate() -> None:
    n, p = 200_000, 0.1
    mask = apply_text_dropout(n, p, generator=_gen(0))
    assert mask.shape == (n,) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert not apply_text_dropout(100, 0.0, generator=_gen(1)).any()
    assert apply_text_dropout(100, 1.0, generator=_gen(1)).all()
    assert torch.equal(apply_text_dropout(64, 0.5, _gen(2)), apply_text_dropout(64, 0.5, _gen(2)))


# ---------------------------------------------------------------- guidance


def test_guided_velocity() -> None:
    v_pos, v_neg = _data(9)
    pc, nc = v_pos.clone(), v_neg.clone()
    assert torch.equal(guided_velocity(v_pos, v_neg, 0.0), v_pos)
    torch.testing.assert_close(guided_velocity(v_pos, v_neg, 1.0), 2 * v_pos - v_neg)
    # omega = s - 1 in the "uncond + s (cond - uncond)" convention.
    omega = 7.0
    torch.testing.assert_close(guided_velocity(v_pos, v_neg, omega), v_neg + (1 + omega) * (v_pos - v_neg))
    # Per-sample omega.
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])
    gv = guided_velocity(v_pos, v_neg, w)
    for i in range(4):
        torch.testing.assert_close(gv[i], guided_velocity(v_pos[i], v_neg[i], float(w[i])))
    assert torch.equal(v_pos, pc) and torch.equal(v_neg, nc)


class _CountingModel:
    """Row-independent toy conditional model ``v = x·w(rewards) + t·bias(text)``."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, rewards: Tensor, text: Tensor) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        w = torch.nan_to_num(rewards, nan=-1.0).sum(dim=1).view(-1, 1, 1, 1)
        bias = text.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x * w + t.view(-1, 1, 1, 1) * bias


def test_cfg_model_fn_equals_separate_forwards() -> None:
    g = _gen(10)
    b = 3
    x = torch.randn(b, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    cond_pos = {
        "rewards": torch.ones(b, 4, dtype=torch.float64),
        "text": torch.randn(b, 5, 6, generator=g, dtype=torch.float64),
    }
    cond_neg = {"rewards": torch.zeros(b, 4, dtype=torch.float64), "text": cond_pos["text"].clone()}
    cond_neg["rewards"][:, 2] = float("nan")
    snapshot = {k: v.clone() for k, v in (cond_pos | {"x": x, "t": t}).items()}
    model = _CountingModel()
    f = cfg_model_fn(model, cond_pos, cond_neg, omega=7.0)
    out = f(x, t)
    assert model.batch_sizes == [2 * b]  # one batched forward
    v_pos = model(x, t, **cond_pos)
    v_neg = model(x, t, **cond_neg)
    assert torch.equal(out, guided_velocity(v_pos, v_neg, 7.0))
    assert torch.equal(out, v_pos + 7.0 * (v_pos - v_neg))
    for k, v in (cond_pos | {"x": x, "t": t}).items():
        assert torch.equal(v, snapshot[k]), k
    # omega = 0: a single positive forward.
    model.batch_sizes.clear()
    f0 = cfg_model_fn(model, cond_pos, cond_neg, omega=0.0)
    assert torch.equal(f0(x, t), v_pos) and model.batch_sizes == [b]


def test_cfg_model_fn_with_a_real_layer() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8 + 2, 8)

    def model(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return lin(torch.cat([x, t[:, None], s], dim=1))

    g = _gen(11)
    x, t = torch.randn(5, 8, generator=g), torch.rand(5, generator=g)
    pos, neg = {"s": torch.ones(5, 1)}, {"s": torch.zeros(5, 1)}
    with torch.no_grad():
        out = cfg_model_fn(model, pos, neg, 2.0)(x, t)
        expected = guided_velocity(model(x, t, **pos), model(x, t, **neg), 2.0)
    torch.testing.assert_close(out, expected)


def test_cfg_model_fn_validates() -> None:
    with pytest.raises(ValueError, match="keys"):
        cfg_model_fn(lambda x, t, **c: x, {"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="differ"):
        cfg_model_fn(lambda x, t, **c: x, {"a": torch.zeros(2, 3)}, {"a": torch.zeros(2, 4)}, 1.0)
    f = cfg_model_fn(lambda x, t, **c: x, {"a": torch.zeros(2)}, {"a": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="batch"):
        f(torch.zeros(3, 1), torch.zeros(3))


# ---------------------------------------------------------------- sampler


def test_timesteps() -> None:
    ts = timesteps(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = timesteps(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert abs(shifted[2].item() - 0.75) < 1e-12  # 3·0.5 / (1 + 2·0.5)
    assert torch.all(torch.diff(shifted) < 0)
    assert torch.all(shifted[1:-1] > ts[1:-1])  # more time at high noise
    with pytest.raises(ValueError):
        timesteps(0)


@pytest.mark.parametrize("steps", [1, 5, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_point_mass_is_exact(steps: int, shift: float) -> None:
    # Data = constant c: eps = (x_t − (1−t)c)/t, so v = eps − c = (x_t − c)/t. Euler is exact for
    # this field (x_t − c is linear in t), so we land on c up to float rounding.
    c = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)

    def v(x: Tensor, t: Tensor) -> Tensor:
        return (x - c) / t.view(-1, 1, 1, 1)

    x0 = euler_sample(v, (8, 3, 4, 4), steps=steps, generator=_gen(0), shift=shift)
    assert x0.shape == (8, 3, 4, 4) and x0.dtype == torch.float32
    torch.testing.assert_close(x0, c.expand(8, 3, 4, 4), atol=1e-5, rtol=0)


def test_euler_gaussian_toy_converges() -> None:
    # Data x ~ N(mu, sigma²) in 1-D. With m_t = (1−t)mu and s_t² = (1−t)²sigma² + t², the optimal
    # velocity is E[eps − x | x_t] = (t − (1−t)sigma²)/s_t² · (x_t − m_t) − mu and the exact flow
    # maps noise eps to mu + sigma·eps.
    mu, sigma = 1.5, 0.3

    def v(x: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, 1)
        s2 = (1 - tt) ** 2 * sigma**2 + tt**2
        return (tt - (1 - tt) * sigma**2) / s2 * (x - (1 - tt) * mu) - mu

    eps = torch.randn(4096, 1, generator=_gen(1), dtype=torch.float64)
    eps_copy = eps.clone()
    errs = []
    for steps in (25, 100, 400):
        x0 = euler_sample(v, eps.shape, steps=steps, dtype=torch.float64, x_init=eps)
        errs.append((x0 - (mu + sigma * eps)).abs().max().item())
    assert torch.equal(eps, eps_copy)  # x_init untouched
    assert errs[2] < 1e-2
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5  # first order: 4× steps → ≈4× less
    x0 = euler_sample(v, (20_000, 1), steps=200, generator=_gen(2), dtype=torch.float64)
    assert abs(x0.mean().item() - mu) < 0.01 and abs(x0.std().item() - sigma) < 0.01


def test_euler_sampler_calls_and_determinism() -> None:
    seen: list[tuple[tuple[int, ...], float, torch.dtype]] = []

    def v(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and torch.all(t == t[0])
        seen.append((tuple(x.shape), t[0].item(), t.dtype))
        return torch.ones_like(x)

    x_init = torch.zeros(2, 3)
    out = euler_sample(v, (2, 3), steps=4, x_init=x_init)
    assert [s[1] for s in seen] == [1.0, 0.75, 0.5, 0.25] and seen[0][2] == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), -1.0))  # x_0 = x_1 − ∫ v dt = −1
    assert torch.equal(x_init, torch.zeros(2, 3))
    a = euler_sample(lambda x, t: x, (2, 3), steps=3, generator=_gen(5))
    b = euler_sample(lambda x, t: x, (2, 3), steps=3, generator=_gen(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        euler_sample(v, (2, 4), steps=2, x_init=x_init)


def test_euler_with_cfg_end_to_end() -> None:
    # Guided point masses: pos → c⁺, neg → c⁻; the guided field at omega targets c⁺ + ω(c⁺ − c⁻).
    def model(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return (x - c.view(-1, 1)) / t.view(-1, 1)

    b = 4
    f = cfg_model_fn(model, {"c": torch.full((b,), 1.0)}, {"c": torch.full((b,), 0.5)}, omega=2.0)
    x0 = euler_sample(f, (b, 3), steps=10, generator=_gen(3))
    torch.testing.assert_close(x0, torch.full((b, 3), 2.0), atol=1e-5, rtol=0)
