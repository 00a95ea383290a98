"""Reward-vector embedding for MIRO conditioning.

Each reward value ``s_r`` (in ``[0, 1]``, on the binned ``k/G`` grid with ``G = num_bins - 1``;
NaN = absent) gets a per-reward vector ``e_r``. Two feature modes exist (``features``):

``"fourier"`` (the original mode, kept so checkpoints written with it load and sample the same)::

    e_r = MLP_r(fourier(s_r)) + pos_r          if s_r is present
    e_r = null_r + pos_r                       if s_r is NaN (absent)

``"grid_interp"`` (the default of new models): with ``u = clamp(s_r, 0, 1)·G``, ``k = floor(u)``,
``k' = min(k + 1, G)`` and ``w = u - k``::

    e_r = lerp(MLP_r(fourier(k / G)), MLP_r(fourier(k' / G)), w) + pos_r

so the MLP is only ever evaluated on the grid the model trains on, a grid value gives exactly its
grid embedding (``w = 0``; ``u`` within 1e-4 of an integer is snapped to it so float rounding of
``k/G`` does not matter), and any target between two grid values gets an embedding on the segment
between theirs. With the fourier mode an off-grid target is a point of feature space the model
never saw (docs/fidelity.md, "Reward embedding").

``fourier(s) = [s, sin(2π f_k s), cos(2π f_k s)]_k`` uses ``num_frequencies`` fixed frequencies
``f_k`` log-spaced between 1 and ``max_frequency`` cycles per unit, ``MLP_r`` is the reward's own
``Linear -> SiLU -> Linear(dim)`` and ``pos_r`` / ``null_r`` are learned per-reward vectors. Both
modes have the same parameters (a checkpoint's weights fit either). The pooled embedding
:meth:`RewardEmbedder.forward` is the **mean** over rewards of ``e_r`` (so its scale does not depend
on how many rewards a model is conditioned on); :meth:`RewardEmbedder.tokens` returns the
per-reward ``e_r`` as tokens.

Initialisation (DiT "zero" style): the last layer of every MLP, the null embeddings and the
position embeddings start at zero, so a freshly initialised MIRO model computes exactly the
same function as the baseline (``reward_names=[]``); the reward path opens during training.
Pass ``zero_init=False`` for a small random init instead.

NaN safety: NaNs are replaced by 0 *before* any arithmetic and the null embedding is selected
with :func:`torch.where`, so neither the output nor any gradient ever contains NaN.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["RewardEmbedder", "RewardFeatures", "REWARD_FEATURES", "grid_neighbours"]

#: How a reward value becomes the MLP's input (see the module docstring).
RewardFeatures = Literal["fourier", "grid_interp"]
REWARD_FEATURES: tuple[str, ...] = get_args(RewardFeatures)

#: ``u = s·G`` closer than this to an integer is that grid point (absorbs float rounding of ``k/G``).
_SNAP = 1e-4


def grid_neighbours(values: Tensor, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two grid neighbours of NaN-free ``values`` (any shape) on the ``k / grid`` grid.

    Values are clamped to ``[0, 1]`` first. Returns ``(lo, hi, w)``, each shaped like ``values``:
    ``lo = k / grid`` and ``hi = min(k + 1, grid) / grid`` (both in ``values.dtype``) with
    ``k = floor(values·grid)``, and the weight ``w = values·grid - k`` in ``[0, 1)``, so that
    ``values = lo + w·(hi - lo)``. A value within ``1e-4`` grid steps of a grid point is that grid
    point (``w = 0``). ``w`` carries the gradient with respect to ``values`` (``grid`` inside
    ``(0, 1)``, 0 where clamped); ``lo`` and ``hi`` carry none.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    u = values.clamp(0.0, 1.0) * grid
    near = torch.round(u.detach())
    u = torch.where((u.detach() - near).abs() < _SNAP, near + (u - u.detach()), u)
    k = torch.floor(u.detach())
    w = u - k
    lo = (k.double() / grid).to(values.dtype)
    hi = (torch.clamp(k + 1, max=grid).double() / grid).to(values.dtype)
    return lo, hi, w


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
        features: ``"fourier"`` (the MLP sees the value itself) or ``"grid_interp"`` (the MLP
            sees the two neighbouring grid values and its outputs are interpolated).
        grid: ``G`` of the ``k/G`` grid (``num_bins - 1``); used by ``"grid_interp"`` only.
    """

    def __init__(
        self,
        reward_names: list[str],
        dim: int,
        num_frequencies: int = 16,
        max_frequency: float = 64.0,
        hidden_dim: int | None = None,
        zero_init: bool = True,
        features: RewardFeatures = "fourier",
        grid: int = 63,
    ) -> None:
        super().__init__()
        if features not in REWARD_FEATURES:
            raise ValueError(f"features must be one of {REWARD_FEATURES}, got {features!r}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
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
        self.features: RewardFeatures = features
        self.grid = int(grid)
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

    def _mlp(self, values: Tensor) -> Tensor:
        """Per-reward MLP of the Fourier features of NaN-free values: ``[B, R] -> [B, R, dim]``."""
        feats = self.fourier_features(values)  # [B, R, 2F+1]
        hidden = torch.einsum("brf,rfh->brh", feats, self.w1) + self.b1  # [B, R, H]
        hidden = torch.nn.functional.silu(hidden)
        return torch.einsum("brh,rhd->brd", hidden, self.w2) + self.b2  # [B, R, D]

    def _grid_interp(self, values: Tensor) -> Tensor:
        """``lerp(MLP(lo), MLP(hi), w)`` over the grid neighbours of NaN-free values: ``[B, R] -> [B, R, dim]``."""
        lo, hi, w = grid_neighbours(values, self.grid)  # [B, R] each
        both = self._mlp(torch.cat([lo, hi], dim=0))  # [2B, R, D]: one pass for both neighbours
        at_lo, at_hi = both.split(values.shape[0], dim=0)
        return torch.lerp(at_lo, at_hi, w.unsqueeze(-1).to(at_lo.dtype))  # exact at w = 0 (and w = 1)

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
        out = self._grid_interp(clean) if self.features == "grid_interp" else self._mlp(clean)  # [B, R, D]
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
        grid = f", grid={self.grid}" if self.features == "grid_interp" else ""
        return (
            f"rewards={self.reward_names}, dim={self.dim}, num_frequencies={self.num_frequencies}, "
            f"features={self.features}{grid}"
        )
