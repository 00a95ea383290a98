"""One optimiser step: its inputs (:func:`make_batch` -> :class:`StepBatch`) and the step (:func:`train_step`).

Everything random in a step is a pure function of ``(train.seed, step, global sample index)``:
the batch indices, the synthetic-caption choice, ``t``, the noise, reward dropout and text dropout
are drawn for the *whole global batch* from generators seeded with ``step_seed(seed, step, k)``
(``k`` = 0..4, in that order) on every rank, then sliced ``[r·B/W, (r+1)·B/W)``. So a run is
independent of the world size and resumes exactly from a checkpoint's step. VAE latents add one
stream, :data:`POSTERIOR_STREAM`: the posterior noise ``ε`` of ``z = mean + std·ε``
(:func:`posterior_eps`; docs/architecture.md, "Text-embedding sidecars"); pixel runs never draw it.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from miroflow.data.train_data import TextArrays, step_seed
from miroflow.flow import (
    apply_reward_dropout,
    apply_text_dropout,
    flow_matching_loss,
    interpolate,
    sample_t,
    velocity_target,
)
from miroflow.train_state import TrainState

__all__ = [
    "POSTERIOR_STREAM",
    "T_BINS",
    "StepBatch",
    "StepMetrics",
    "make_batch",
    "posterior_eps",
    "train_step",
    "to_model_space",
]

#: Equal-width t-bins of the ``loss/t_bin_k`` metrics.
T_BINS = 10


@dataclass(frozen=True)
class StepBatch:
    """This rank's inputs of global step ``step`` (``b = train.batch_size / world`` rows, on the device).

    Attributes:
        x0: ``[b, C, h, w]`` clean samples in model space.
        t: ``[b]`` times in ``[0, 1]``.
        noise: ``[b, C, h, w]`` Gaussian noise.
        rewards: ``[b, R]`` conditioning values, NaN = absent or dropped; None for a baseline (R = 0).
        text: precomputed text (``tokens [b, L, D]`` fp32, ``mask [b, L]``, ``pooled [b, Dp]`` fp32) with
            dropped captions replaced by the empty caption; None for a trainable text encoder.
        captions: the ``b`` captions used (``""`` where dropped).
        keys: the ``b`` samples' keys.
    """

    step: int
    x0: Tensor
    t: Tensor
    noise: Tensor
    rewards: Tensor | None
    text: TextArrays | None
    captions: tuple[str, ...]
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepMetrics:
    """What one step measured (global-batch values, identical on every rank).

    ``step`` is the step count after it; ``t_bin_losses[k]`` the mean loss of the samples with ``t``
    in ``[k/T, (k+1)/T)`` (None where the bin was empty); ``wall_s`` the seconds :func:`train_step` took;
    ``ema_decay`` the decay the step's EMA update applied (:func:`~miroflow.train_state.ema_decay_at`).
    """

    step: int
    loss: float
    t_bin_losses: tuple[float | None, ...]
    grad_norm: float
    lr: float
    wall_s: float
    batch_size: int
    ema_decay: float = float("nan")

    @property
    def img_per_s(self) -> float:
        """Global-batch images per second of the step itself."""
        return self.batch_size / max(1e-9, self.wall_s)

    def log_metrics(self, img_per_s: float | None = None) -> dict[str, float]:
        """``loss``, ``lr``, ``grad_norm``, ``img_per_s`` (default: :attr:`img_per_s`), ``loss/t_bin_k``,
        ``train/ema_decay``."""
        out = {
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "img_per_s": self.img_per_s if img_per_s is None else img_per_s,
        }
        out.update({f"loss/t_bin_{k}": v for k, v in enumerate(self.t_bin_losses) if v is not None})
        out["train/ema_decay"] = self.ema_decay
        return out


#: ``step_seed`` stream of the VAE posterior noise (after the 0..4 of :func:`make_batch`).
POSTERIOR_STREAM = 5


def posterior_eps(seed: int, step: int, batch_size: int, shape: tuple[int, int, int]) -> Tensor:
    """The posterior noise ``ε [B, C, h, w]`` of global step ``step``'s whole batch: a pure function of
    ``(seed, step)`` (``step_seed(seed, step, POSTERIOR_STREAM)``); each rank takes its rows."""
    g = torch.Generator().manual_seed(step_seed(seed, step, POSTERIOR_STREAM))
    return torch.randn((batch_size, *shape), generator=g)


def to_model_space(x: Tensor, codec: Any, device: torch.device, eps: Tensor | None = None) -> Tensor:
    """uint8 images ``[b, H, W, 3]``, a raw fp16 latent posterior ``[b, 2, C, h, w]`` (mean, std) or raw
    latents ``[b, C, h, w]`` -> normalised ``[b, C, h, w]``.

    A posterior is sampled as ``z = mean + std·eps`` (``eps [b, C, h, w]``; None takes the mean), then
    normalised by the codec's channel stats: ``(z - mean_c) / std_c``.
    """
    if x.dtype == torch.uint8:
        return codec.encode(x.to(device).permute(0, 3, 1, 2).float() / 255.0)  # type: ignore[no-any-return]
    if x.dim() == 5:
        mean, std = x[:, 0].to(device, torch.float32), x[:, 1].to(device, torch.float32)
        z = mean if eps is None else mean + std * eps.to(device, torch.float32)
    else:
        z = x.to(device, torch.float32)
    return (z - codec.mean.view(1, -1, 1, 1).to(device)) / codec.std.view(1, -1, 1, 1).to(device)


def _text_inputs(text: TextArrays, drop: Tensor, empty: TextArrays, device: torch.device) -> TextArrays:
    """Precomputed text ``[b, ...]`` of a batch with the captions where ``drop [b]`` replaced by ``empty``."""
    tok = torch.where(drop[:, None, None], empty.tokens, text.tokens).to(device, torch.float32)
    mask = torch.where(drop[:, None], empty.mask, text.mask).to(device)
    pooled = torch.where(drop[:, None], empty.pooled, text.pooled).to(device, torch.float32)
    return TextArrays(tok, mask, pooled)


def make_batch(state: TrainState, step: int | None = None) -> StepBatch:
    """Draw this rank's inputs of global step ``step`` (default ``state.step``); a pure function of
    ``(train.seed, step)`` and the data (it does not touch the global torch RNG)."""
    tp, device = state.params.train, state.device
    step = state.step if step is None else step
    n, sl = tp.batch_size, state.rows
    g = [torch.Generator().manual_seed(step_seed(tp.seed, step, k)) for k in range(5)]
    use_syn = torch.rand(n, generator=g[0]) < tp.synthetic_caption_prob
    t_all = sample_t(n, generator=g[1])
    noise_all = torch.randn((n, *state.shape), generator=g[2])
    rdrop = apply_reward_dropout(
        torch.zeros(n, len(state.reward_names)), tp.reward_dropout, tp.all_reward_dropout, generator=g[3]
    ).isnan()
    tdrop = apply_text_dropout(n, tp.text_dropout, generator=g[4])
    batch = state.source.batch(step, sl, use_syn[sl])
    eps = posterior_eps(tp.seed, step, n, state.shape)[sl] if batch.x.dim() == 5 else None
    x0 = to_model_space(batch.x, state.codec, device, eps)
    rew = batch.rewards.masked_fill(rdrop[sl], float("nan")).to(device)
    caps = tuple("" if d else c for c, d in zip(batch.captions, tdrop[sl].tolist()))
    text = None
    if batch.text is not None:
        if state.empty is None:
            raise RuntimeError("precomputed text needs the frozen encoder's empty caption (TrainInputs.frozen)")
        text = _text_inputs(batch.text, tdrop[sl], state.empty, device)
    t, noise = t_all[sl].to(device), noise_all[sl].to(device)
    keys = tuple(batch.keys or ())
    return StepBatch(step, x0, t, noise, rew if state.reward_names else None, text, caps, keys)


def train_step(state: TrainState, batch: StepBatch) -> StepMetrics:
    """Forward/backward over ``train.grad_accum`` micro-batches (DDP syncs on the last), clip, AdamW,
    LR schedule, EMA, all-reduce of the loss sums; increments ``state.step``.

    Raises:
        ValueError: ``batch`` was drawn for another step than ``state.step``.
    """
    if batch.step != state.step:
        raise ValueError(f"batch.step {batch.step} != state.step {state.step} (draw it with make_batch(state))")
    t0 = time.perf_counter()
    tp, world, micro = state.params.train, state.dist.world, state.micro
    state.opt.zero_grad(set_to_none=True)
    sums = torch.zeros(2 * T_BINS + 1, dtype=torch.float64, device=state.device)
    for m in range(tp.grad_accum):
        ms = slice(m * micro, (m + 1) * micro)
        x_t = interpolate(batch.x0[ms], batch.noise[ms], batch.t[ms])
        sync: AbstractContextManager[Any] = nullcontext()
        if world > 1 and m < tp.grad_accum - 1:
            sync = state.ddp.no_sync()  # type: ignore[operator]
        with sync:
            with state.autocast:
                text = (
                    (batch.text.tokens[ms], batch.text.mask[ms], batch.text.pooled[ms])
                    if batch.text is not None
                    else (None, None, None)
                )
                pred = state.fwd(
                    x_t,
                    batch.t[ms],
                    *text,
                    batch.rewards[ms] if batch.rewards is not None else None,
                    list(batch.captions[ms]),
                )
            loss, per_bin, counts = flow_matching_loss(
                pred.float(), velocity_target(batch.x0[ms], batch.noise[ms]), batch.t[ms], T_BINS
            )
            (loss * (micro * world / tp.batch_size)).backward()
        sums += torch.cat([(per_bin * counts).double(), counts.double(), (loss.detach() * micro).double().reshape(1)])
    grad_norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), tp.grad_clip)
    state.opt.step()
    state.sched.step()
    state.ema.step(state.net.parameters())
    if world > 1:
        dist.all_reduce(sums)
    state.step += 1
    s = sums.cpu()
    state.last_loss = float(s[-1] / tp.batch_size)
    bins = tuple(float(s[k] / s[T_BINS + k]) if s[T_BINS + k] > 0 else None for k in range(T_BINS))
    return StepMetrics(
        step=state.step,
        loss=state.last_loss,
        t_bin_losses=bins,
        grad_norm=float(grad_norm),
        lr=float(state.sched.get_last_lr()[0]),
        wall_s=time.perf_counter() - t0,
        batch_size=tp.batch_size,
        ema_decay=state.ema.last_decay,
    )
