"""Flow-matching math for MIRO (docs/design.md §1, §3): pure functions on tensors, no I/O.

Conventions
-----------
- ``t = 0`` is data, ``t = 1`` is noise: ``x_t = (1 - t)·x + t·ε`` with ``ε ~ N(0, I)``.
- The model predicts the velocity ``v = dx_t/dt = ε − x`` (the regression target).
- Sampling integrates the ODE from ``t = 1`` down to ``t = 0``: ``x_{t−Δ} = x_t − Δ·v(x_t, t)``.
- Guidance (docs/design.md §1): ``v̂ = v⁺ + ω·(v⁺ − v⁻)``. In the common "uncond + s·(cond − uncond)"
  convention (with ``v⁻`` playing "uncond") this is ``s = 1 + ω``: ``ω = 0`` means no guidance,
  the paper's default ``ω = 7`` is ``s = 8``.

Randomness: every sampler takes an optional ``torch.Generator``. Random numbers are drawn on the
generator's device and then moved to ``device``, so a CPU generator gives the same numbers whatever
``device`` is (and a CUDA generator may be used with a CUDA ``device``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "ModelFn",
    "sample_t",
    "interpolate",
    "velocity_target",
    "flow_matching_loss",
    "t_bin_index",
    "apply_reward_dropout",
    "apply_text_dropout",
    "guided_velocity",
    "cfg_model_fn",
    "timesteps",
    "euler_sample",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x_t [B, ...], t [B] float32) -> v [B, ...]``."""


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _out_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def sample_t(
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Logit-normal times ``t = sigmoid(mean + std·z)``, ``z ~ N(0, 1)``.

    Returns:
        ``Tensor[batch]`` float32 on ``device``, in (0, 1) (median ``sigmoid(mean)``).
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    z = torch.randn(batch, generator=generator, device=_draw_device(generator, device))
    return torch.sigmoid(z * std + mean).to(_out_device(device, generator))


def _expand_t(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as ``[B, 1, ..., 1]`` (or a 0-d tensor) in ``like``'s dtype/device for broadcasting."""
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if tt.ndim == 0:
        return tt
    if tt.ndim != 1 or tt.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a scalar or [B]={like.shape[0]}, got shape {tuple(tt.shape)}")
    return tt.reshape(tt.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 − t)·x0 + t·noise``.

    Args:
        x0: data ``[B, ...]`` (e.g. ``[B, C, H, W]``).
        noise: ``ε``, same shape as ``x0``.
        t: ``[B]`` (broadcast over the non-batch dims) or a scalar.

    Returns:
        ``x_t`` with the shape and dtype of ``x0``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    tt = _expand_t(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``v = dx_t/dt = noise − x0`` (same shape as the inputs)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return noise - x0


def t_bin_index(t: Tensor, num_bins: int = 10) -> Tensor:
    """Equal-width bin of each ``t`` in [0, 1]: ``clamp(floor(t·num_bins), 0, num_bins−1)``, int64 ``[B]``."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return torch.clamp(torch.floor(t.detach().double() * num_bins), 0, num_bins - 1).long()


def flow_matching_loss(pred: Tensor, target: Tensor, t: Tensor, num_bins: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-squared error, plus its breakdown over equal-width t-bins (for ``loss/t_bin_k``).

    Args:
        pred: predicted velocity ``[B, ...]``.
        target: ``noise − x0``, same shape.
        t: ``[B]`` times in [0, 1] (bin k holds ``k/num_bins <= t < (k+1)/num_bins``; t = 1 → last).
        num_bins: number of t-bins.

    Returns:
        ``loss``: 0-d float32, differentiable, the mean over all elements.
        ``per_bin_loss``: ``[num_bins]`` float32, detached: mean per-sample MSE of the samples in
            each bin; **0 for an empty bin** (check ``per_bin_count`` before logging).
        ``per_bin_count``: ``[num_bins]`` int64 number of samples per bin.
        ``(per_bin_loss * per_bin_count).sum() / B == loss`` up to float rounding.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if t.ndim != 1 or t.shape[0] != pred.shape[0]:
        raise ValueError(f"t must be [B]={pred.shape[0]}, got {tuple(t.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    loss = per_sample.mean()
    with torch.no_grad():
        idx = t_bin_index(t, num_bins).to(per_sample.device)
        onehot = torch.nn.functional.one_hot(idx, num_bins).to(torch.float64)  # [B, K]
        sums = onehot.T @ per_sample.detach().double()  # [K]
        counts = onehot.sum(dim=0).round().long()  # [K]
        per_bin = torch.where(counts > 0, sums / counts.clamp_min(1).double(), torch.zeros_like(sums))
    return loss, per_bin.float(), counts


def apply_reward_dropout(
    values: Tensor,
    p_each: float,
    p_all: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mark reward values absent (NaN) at random, for training with null embeddings.

    Each entry is dropped independently with probability ``p_each``; independently, each whole
    row is dropped with probability ``p_all``. Entries already NaN stay NaN. Never in place.

    Args:
        values: ``[B, R]`` float conditioning values (NaN = absent).

    Returns:
        A new ``[B, R]`` tensor (same dtype/device).
    """
    if values.ndim != 2:
        raise ValueError(f"values must be [B, R], got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point (NaN = absent), got {values.dtype}")
    _check_prob("p_each", p_each)
    _check_prob("p_all", p_all)
    b, r = values.shape
    dev = _draw_device(generator, values.device)
    u_each = torch.rand(b, r, generator=generator, device=dev)
    u_all = torch.rand(b, generator=generator, device=dev)
    drop = (u_each < p_each) | (u_all < p_all)[:, None]
    return values.masked_fill(drop.to(values.device), float("nan"))


def apply_text_dropout(
    n: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``Tensor[n]`` bool, True where the caption is dropped (replaced by the empty caption)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_prob("p", p)
    u = torch.rand(n, generator=generator, device=_draw_device(generator, device))
    return (u < p).to(_out_device(device, generator))


def guided_velocity(v_pos: Tensor, v_neg: Tensor, omega: float | Tensor) -> Tensor:
    """``v_pos + ω·(v_pos − v_neg)`` (docs/design.md §1).

    ``ω`` here equals ``s − 1`` for the "uncond + s·(cond − uncond)" convention; ``ω = 0``
    returns ``v_pos``. ``omega`` may be a float, a 0-d tensor or a ``[B]`` tensor (per sample).
    """
    if v_pos.shape != v_neg.shape:
        raise ValueError(f"v_pos {tuple(v_pos.shape)} and v_neg {tuple(v_neg.shape)} differ")
    w = _expand_t(omega, v_pos) if isinstance(omega, Tensor) else omega
    return v_pos + w * (v_pos - v_neg)


def cfg_model_fn(
    model_fn: Callable[..., Tensor],
    cond_pos: Mapping[str, Tensor],
    cond_neg: Mapping[str, Tensor],
    omega: float,
) -> ModelFn:
    """Wrap a conditional model into a guided ``(x_t, t) -> v`` with one batched forward.

    Args:
        model_fn: ``model_fn(x [N, ...], t [N], **cond) -> v [N, ...]``; it must treat batch rows
            independently.
        cond_pos: keyword tensors with leading batch dim ``B`` (e.g. ``rewards [B, R]``,
            ``text [B, L, D]``) for ``s⁺``.
        cond_neg: same keys and shapes, for ``s⁻``.
        omega: guidance weight ω (``s = 1 + ω``).

    Returns:
        ``f(x_t [B, ...], t [B]) -> v̂ [B, ...]`` that runs ``model_fn`` once on ``2B`` rows
        (``[x; x]``, ``[t; t]``, ``[cond_pos; cond_neg]`` concatenated along dim 0), splits the
        output into ``v⁺, v⁻`` and returns :func:`guided_velocity`. With ``omega == 0`` the
        negative half is skipped and ``model_fn(x, t, **cond_pos)`` is returned.
    """
    if set(cond_pos) != set(cond_neg):
        raise ValueError(f"cond_pos and cond_neg keys differ: {sorted(cond_pos)} vs {sorted(cond_neg)}")
    for k in cond_pos:
        a, b = cond_pos[k], cond_neg[k]
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise TypeError(f"cond[{k!r}] must be tensors")
        if a.shape != b.shape:
            raise ValueError(f"cond[{k!r}]: positive {tuple(a.shape)} and negative {tuple(b.shape)} differ")
    cond_both = {k: torch.cat([cond_pos[k], cond_neg[k]], dim=0) for k in cond_pos}
    pos = dict(cond_pos)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        bsz = x.shape[0]
        for k, v in pos.items():
            if v.shape[0] != bsz:
                raise ValueError(f"cond[{k!r}] has batch {v.shape[0]}, x has {bsz}")
        if omega == 0:
            return model_fn(x, t, **pos)
        out = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **cond_both)
        v_pos, v_neg = out[:bsz], out[bsz:]
        return guided_velocity(v_pos, v_neg, omega)

    return guided


def timesteps(
    steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Decreasing time grid ``[steps + 1]`` from 1 to 0.

    Uniform ``u_i = 1 − i/steps`` mapped by the SD3-style shift ``t = shift·u / (1 + (shift − 1)·u)``
    (identity at ``shift = 1``; ``shift > 1`` spends more steps at high noise). Endpoints stay
    exactly 1 and 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * u / (1 + (shift - 1) * u)
    t[0], t[-1] = 1.0, 0.0
    return t.to(device=device, dtype=dtype)


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...] | torch.Size,
    steps: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Tensor | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` with Euler steps.

    ``x_{t_{i+1}} = x_{t_i} + (t_{i+1} − t_i)·v(x_{t_i}, t_i)`` on :func:`timesteps` (uniform
    at ``shift = 1``), i.e. ``x_{t−Δ} = x_t − Δ·v``. Runs under ``torch.no_grad``.

    Args:
        model_fn: ``(x_t [B, ...] in dtype, t [B]) -> v [B, ...]``; ``t`` is float32, or float64
            when ``dtype`` is float64.
        shape: ``[B, ...]`` of the sample (ignored except for checking when ``x_init`` is given).
        steps: number of model evaluations.
        generator: for the initial noise ``x_1 ~ N(0, I)``.
        x_init: optional starting noise ``[B, ...]`` (not modified).

    Returns:
        ``x_0`` of ``shape``, ``dtype``, on ``device``.
    """
    out_dev = _out_device(device, generator) if x_init is None or device is not None else x_init.device
    if x_init is not None:
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init shape {tuple(x_init.shape)} != shape {tuple(shape)}")
        x = x_init.to(device=out_dev, dtype=dtype).clone()
    else:
        x = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device))
        x = x.to(device=out_dev, dtype=dtype)
    ts = timesteps(steps, shift=shift)
    t_dtype = torch.promote_types(dtype, torch.float32)
    bsz = x.shape[0]
    for i in range(steps):
        t_cur, t_next = float(ts[i]), float(ts[i + 1])
        t_vec = torch.full((bsz,), t_cur, dtype=t_dtype, device=out_dev)
        v = model_fn(x, t_vec)
        if v.shape != x.shape:
            raise ValueError(f"model_fn returned {tuple(v.shape)}, expected {tuple(x.shape)}")
        x = x + (t_next - t_cur) * v.to(dtype)
    return x
