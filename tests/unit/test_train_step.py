"""The train step as a function: StepMetrics, the step counter, determinism, input checks (CPU, tiny, in memory)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from miroflow.checkpoint import TRAIN_STATE
from miroflow.config import Params, apply_overrides
from miroflow.data.train_data import TextArrays, TrainData
from miroflow.models import PixelCodec, TextEmbedding, create_denoiser
from miroflow.train_state import DistContext, TrainInputs, TrainState, create_train_state, save_train_checkpoint
from miroflow.train_step import T_BINS, StepMetrics, make_batch, train_step

N, L, D = 16, 8, 16
REWARDS = ["sharpness", "noise"]


class ZeroEncoder:
    """A frozen-encoder stand-in: every caption encodes to one real zero token."""

    name, dim, pooled_dim, max_length = "zero", D, D, L

    def encode(self, prompts: list[str]) -> TextEmbedding:
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        mask[:, 0] = True
        return TextEmbedding(torch.zeros(len(prompts), L, D), mask, torch.zeros(len(prompts), D))


def _text(g: torch.Generator) -> TextArrays:
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (N,), generator=g)[:, None]
    return TextArrays(
        (torch.randn(N, L, D, generator=g) * mask[..., None]).half(), mask, torch.randn(N, D, generator=g)
    )


def _data() -> TrainData:
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(N, len(REWARDS), generator=g)
    return TrainData(
        keys=[str(i) for i in range(N)],
        images=torch.randint(0, 256, (N, 32, 32, 3), generator=g, dtype=torch.uint8),
        latents=None,
        captions=[f"caption {i}" for i in range(N)],
        syn_captions=[f"synthetic {i}" if i % 2 else None for i in range(N)],
        reward_names=list(REWARDS),
        rewards=rewards,
        syn_rewards=rewards.flip(0),
        text=_text(g),
        syn_text=_text(g),
    )


def build(tmp_path: Path, *overrides: str) -> TrainState:
    """A tiny in-memory TrainState (pixels 3×32×32, 2 rewards, precomputed text)."""
    params = apply_overrides(
        Params(),
        [
            f"storage.root={tmp_path}",
            "train.model=tiny",
            "train.batch_size=8",
            "train.steps=10",
            "train.warmup_steps=2",
            "train.seed=3",
            "train.text_dropout=0.25",
            "train.synthetic_caption_prob=0.5",
            "train.device=cpu",
            *overrides,
        ],
    )
    torch.manual_seed(params.train.seed)
    model = create_denoiser("tiny", REWARDS, text_dim=D, pooled_dim=D)
    inputs = TrainInputs(_data(), PixelCodec(), model, list(REWARDS), {"run_name": "unit"}, frozen=ZeroEncoder())
    return create_train_state(params, inputs, DistContext())


def test_train_step_returns_finite_metrics_and_increments_the_step(tmp_path: Path) -> None:
    state = build(tmp_path)
    batch = make_batch(state)
    assert batch.x0.shape == (8, 3, 32, 32) and batch.t.shape == (8,) and batch.rewards is not None
    assert batch.text is not None and batch.text.tokens.shape == (8, L, D) and len(batch.captions) == 8
    m = train_step(state, batch)
    assert isinstance(m, StepMetrics) and m.step == state.step == 1
    assert all(math.isfinite(v) for v in (m.loss, m.grad_norm, m.lr, m.wall_s, m.img_per_s)) and m.lr > 0
    assert len(m.t_bin_losses) == T_BINS and any(v is not None for v in m.t_bin_losses)
    assert state.last_loss == m.loss
    logged = m.log_metrics(img_per_s=1.0)
    assert list(logged)[:4] == ["loss", "lr", "grad_norm", "img_per_s"] and logged["img_per_s"] == 1.0
    assert {k for k in logged if k.startswith("loss/t_bin_")} == {
        f"loss/t_bin_{k}" for k, v in enumerate(m.t_bin_losses) if v is not None
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.loss = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="batch.step 0 != state.step 1"):
        train_step(state, batch)


def test_same_seed_same_losses_and_make_batch_is_pure(tmp_path: Path) -> None:
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    first, again = make_batch(a, 2), make_batch(a, 2)
    assert (
        torch.equal(first.x0, again.x0) and torch.equal(first.noise, again.noise) and first.captions == again.captions
    )
    la = [train_step(a, make_batch(a)).loss for _ in range(3)]
    lb = [train_step(b, make_batch(b)).loss for _ in range(3)]
    assert la == lb and a.step == b.step == 3
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)


def test_grad_accum_matches_one_micro_batch(tmp_path: Path) -> None:
    one, two = build(tmp_path / "one"), build(tmp_path / "two", "train.grad_accum=2")
    l1 = [train_step(one, make_batch(one)).loss for _ in range(2)]
    l2 = [train_step(two, make_batch(two)).loss for _ in range(2)]
    assert l1 == pytest.approx(l2, abs=1e-5)


def test_checkpoint_train_state_keys(tmp_path: Path) -> None:
    state = build(tmp_path)
    train_step(state, make_batch(state))
    uri = save_train_checkpoint(state, str(tmp_path / "ckpt"))
    ts = torch.load(Path(uri) / TRAIN_STATE, weights_only=True)
    assert list(ts) == ["step", "last_loss", "optimizer", "scheduler", "ema", "rng", "data"]
    assert ts["step"] == 1 and ts["last_loss"] == state.last_loss
    assert ts["data"] == {"step": 1, "samples_seen": 8, "dataset_size": N, "order": {"mode": "memory"}}


def test_bad_inputs_raise_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"train\.batch_size 6 must be divisible by world size 1 × train\.grad_accum 4"
    ):
        build(tmp_path, "train.batch_size=6", "train.grad_accum=4")
    params = apply_overrides(Params(), [f"storage.root={tmp_path}"])
    bad = params.model_copy(update={"train": params.train.model_copy(update={"optimizer": "lamb"})})
    inputs = TrainInputs(_data(), PixelCodec(), create_denoiser("tiny", REWARDS, text_dim=D, pooled_dim=D), REWARDS)
    with pytest.raises(ValueError, match=r"train\.optimizer: 'lamb' is not offered"):
        create_train_state(bad, inputs)


# --------------------------------------------------------------------------- EMA schedule (docs/fidelity.md, "EMA")
def test_ema_decay_schedule_is_diffusers_warmup_or_constant() -> None:
    from diffusers.training_utils import EMAModel

    from miroflow.train_state import ema_decay_at

    for decay in (0.99, 0.999, 0.9999):
        ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
        ours = [ema_decay_at(n, decay) for n in range(1, 3001)]
        assert ours == [ref.get_decay(n) for n in range(1, 3001)]  # float for float
        assert ours[0] == 0.0 and ours[1] == 2 / 11 and ours[-1] == min(decay, 3000 / 3009)
        assert [ema_decay_at(n, decay, warmup=False) for n in (1, 2, 1200)] == [decay] * 3
    assert ema_decay_at(1200, 0.999) == pytest.approx(0.99256, abs=1e-5)  # what ran at 1,200 steps
    with pytest.raises(ValueError, match="start at 1"):
        ema_decay_at(0, 0.999)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_weights_and_logged_decay_follow_the_schedule(tmp_path: Path, warmup: bool) -> None:
    """Default params (warm-up): the EMA weights equal diffusers' EMAModel's bit for bit, as before the
    schedule was ours; without warm-up the decay is train.ema_decay from the first step."""
    from diffusers.training_utils import EMAModel

    decay, extra = (0.999, []) if warmup else (0.9, ["train.ema_warmup=false", "train.ema_decay=0.9"])
    state = build(tmp_path, *extra)
    assert (state.ema.decay, state.ema.warmup) == (decay, warmup)
    ref = EMAModel(list(state.net.parameters()), decay=decay, foreach=False)  # what ran before
    manual = [p.detach().clone() for p in state.net.parameters()]
    logged = []
    for _ in range(12):
        m = train_step(state, make_batch(state))
        logged.append(m.log_metrics()["train/ema_decay"])
        if warmup:
            ref.step(state.net.parameters())
        for s, p in zip(manual, state.net.parameters()):
            s.mul_(decay).add_(p.detach(), alpha=1 - decay)
    want = [ref.get_decay(n) for n in range(1, 13)] if warmup else [0.9] * 12
    assert logged == want and state.ema.last_decay == state.ema.cur_decay_value == want[-1]
    for ours, p, s in zip(state.ema.shadow_params, ref.shadow_params, manual):
        if warmup:
            assert torch.equal(ours, p)
        else:
            torch.testing.assert_close(ours, s, atol=1e-6, rtol=1e-5)
    sd = state.ema.state_dict()
    assert sd["ema_warmup"] is warmup and sd["optimization_step"] == 12
    # A train_state.pt written before ema_warmup existed ran the warm-up.
    fresh = build(tmp_path / "fresh", "train.ema_warmup=false")
    fresh.ema.load_state_dict({k: v for k, v in sd.items() if k not in ("ema_warmup", "shadow_params")})
    assert fresh.ema.warmup is True and fresh.ema.optimization_step == 12
