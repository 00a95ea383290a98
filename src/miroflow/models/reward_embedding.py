"""Reward-vector embedding for MIRO conditioning.

Each reward value ``s_r`` (roughly in ``[0, 1]``, the binned k/63 grid; NaN = absent) gets

    e_r = MLP_r(fourier(s_r)) + pos_r          if s_r is present
    e_r = null_r + pos_r                       if s_r is NaN (absent)

where ``fourier(s) = [s, sin(2π f_k s), cos(2π f_k s)]_k`` uses ``num_frequencies`` fixed
frequencies ``f_k`` log-spaced between 1 and ``max_frequency`` cycles per unit, ``MLP_r`` is
the reward's own ``Linear -> SiLU -> Linear(dim)`` and ``pos_r`` / ``null_r`` are learned
per-reward vectors. The pooled embedding :meth:`RewardEmbedder.forward` is the **mean** over
rewards of ``e_r`` (so its scale does not depend on how many rewards a model is conditioned
on); :meth:`RewardEmbedder.tokens` returns the per-reward ``e_r`` as tokens.

Initialisation (DiT "zero" style): the last layer of every MLP, the null embeddings and the
position embeddings start at zero, so a freshly initialised MIRO model computes exactly the
same function as the baseline (``reward_names=[]``); the reward path opens during training.
Pass ``zero_init=False`` for a small random init instead.

NaN safety: NaNs are replaced by 0 *before* any arithmetic and the null embedding is selected
with :func:`torch.where`, so neither the output nor any gradient ever contains NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RewardEmbedder"]


class RewardEmbedder(nn.Module):
    """Embeds a reward vector ``values[B, R]`` (NaN = absent) into ``[B, dim]``.

    Args:
        reward_names: names of the R rewards, in the column order of ``values``. Empty list =
            baseline: the module has no parameters and returns zeros.
        dim: output width (the denoiser's pooled-projection width).
        num_frequencies: number of sin/cos frequency pairs per value.
        max_frequency: highest frequency in cycles per unit value (lowest is 1).
        hidden_dim: width of each reward's MLP hidden layer (default ``dim``).
        zero_init: zero-initialise the MLPs' last layers and the null/position embeddings.
    """

    def __init__(
        self,
        reward_names: list[str],
        dim: int,
        num_frequencies: int = 16,
        max_frequency: float = 64.0,
        hidden_dim: int | None = None,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if len(set(reward_names)) != len(reward_names):
            raise ValueError(f"reward_names contains duplicates: {reward_names}")
        if dim <= 0 or num_frequencies <= 0:
            raise ValueError(f"dim and num_frequencies must be positive, got {dim}, {num_frequencies}")
        self.reward_names: list[str] = list(reward_names)
        self.dim = dim
        self.num_frequencies = num_frequencies
        self.max_frequency = float(max_frequency)
        self.hidden_dim = hidden_dim or dim
        self.zero_init = zero_init
        r = len(self.reward_names)
        feat = 2 * num_frequencies + 1
        # Fixed angular frequencies 2π·f, f log-spaced in [1, max_frequency]; [F].
        freqs = (
            2.0 * math.pi * torch.logspace(0.0, math.log10(self.max_frequency), num_frequencies, dtype=torch.float64)
        )
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)
        if r == 0:
            return
        h = self.hidden_dim
        # Per-reward MLPs stored as batched weights so all rewards run in one einsum.
        self.w1 = nn.Parameter(torch.empty(r, feat, h))  # [R, 2F+1, H]
        self.b1 = nn.Parameter(torch.empty(r, h))  # [R, H]
        self.w2 = nn.Parameter(torch.empty(r, h, dim))  # [R, H, D]
        self.b2 = nn.Parameter(torch.empty(r, dim))  # [R, D]
        self.null = nn.Parameter(torch.empty(r, dim))  # [R, D]
        self.pos = nn.Parameter(torch.empty(r, dim))  # [R, D]
        self.reset_parameters()

    @property
    def num_rewards(self) -> int:
        """Number of rewards R."""
        return len(self.reward_names)

    def reset_parameters(self) -> None:
        """nn.Linear-style init of the first layer; zero (or N(0, 0.02)) for the rest."""
        if self.num_rewards == 0:
            return
        with torch.no_grad():
            bound1 = 1.0 / math.sqrt(self.w1.shape[1])
            self.w1.uniform_(-bound1, bound1)
            self.b1.uniform_(-bound1, bound1)
            if self.zero_init:
                for p in (self.w2, self.b2, self.null, self.pos):
                    p.zero_()
            else:
                bound2 = 1.0 / math.sqrt(self.w2.shape[1])
                self.w2.uniform_(-bound2, bound2)
                self.b2.uniform_(-bound2, bound2)
                self.null.normal_(0.0, 0.02)
                self.pos.normal_(0.0, 0.02)

    def _check(self, values: Tensor) -> None:
        if values.dim() != 2 or values.shape[1] != self.num_rewards:
            raise ValueError(
                f"rewards must have shape [B, {self.num_rewards}] (one column per reward {self.reward_names}), "
                f"got {tuple(values.shape)}"
            )
        if not values.is_floating_point():
            raise ValueError(f"rewards must be a floating tensor (NaN = absent), got {values.dtype}")

    def fourier_features(self, values: Tensor) -> Tensor:
        """Fourier features of NaN-free values: ``[B, R] -> [B, R, 2F+1]`` (value, sin, cos)."""
        angles = values.unsqueeze(-1) * self.freqs.to(values.dtype)  # [B, R, F]
        return torch.cat([values.unsqueeze(-1), torch.sin(angles), torch.cos(angles)], dim=-1)

    def tokens(self, values: Tensor) -> Tensor:
        """Per-reward embeddings: ``values[B, R]`` (NaN = absent) -> ``[B, R, dim]``.

        For R = 0 returns an empty ``[B, 0, dim]`` tensor.
        """
        self._check(values)
        b = values.shape[0]
        if self.num_rewards == 0:
            return values.new_zeros(b, 0, self.dim)
        dtype = self.w1.dtype
        values = values.to(dtype)
        absent = torch.isnan(values)  # [B, R]
        clean = torch.where(absent, torch.zeros_like(values), values)  # NaN-free before any math
        feats = self.fourier_features(clean)  # [B, R, 2F+1]
        hidden = torch.einsum("brf,rfh->brh", feats, self.w1) + self.b1  # [B, R, H]
        hidden = torch.nn.functional.silu(hidden)
        out = torch.einsum("brh,rhd->brd", hidden, self.w2) + self.b2  # [B, R, D]
        out = torch.where(absent.unsqueeze(-1), self.null.unsqueeze(0).expand_as(out), out)
        return out + self.pos.unsqueeze(0)

    def forward(self, values: Tensor) -> Tensor:
        """Pooled embedding: ``values[B, R]`` (NaN = absent) -> mean over rewards ``[B, dim]``.

        For R = 0 (baseline) returns zeros ``[B, dim]``.
        """
        self._check(values)
        if self.num_rewards == 0:
            dtype = values.dtype if values.is_floating_point() else torch.float32
            return torch.zeros(values.shape[0], self.dim, dtype=dtype, device=values.device)
        return self.tokens(values).mean(dim=1)

    def extra_repr(self) -> str:
        return f"rewards={self.reward_names}, dim={self.dim}, num_frequencies={self.num_frequencies}"
