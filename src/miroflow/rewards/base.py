"""Reward protocol and the errors of the reward registry.

Every reward scores a batch ``images: Tensor[B, 3, H, W]`` (float, RGB, values in [0, 1]) with
their ``prompts: list[str]`` (length B) and returns raw values ``Tensor[B]`` (float32, on CPU).
``normalize`` maps raw values to roughly [0, 1] (docs/design.md §3) before binning. Building rewards by
name lives in :mod:`miroflow.rewards.registry`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from miroflow.data.score_tables import ScoreError
from miroflow.errors import InputError

__all__ = ["Reward", "RewardNotFound", "RewardBuildError"]


@runtime_checkable
class Reward(Protocol):
    """A reward model. ``uses_prompt`` is False for image-only rewards (scored once per image)."""

    name: str
    version: str
    uses_prompt: bool

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw scores ``[B]`` for images ``[B, 3, H, W]`` in [0, 1]."""
        ...

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw values ``[N]`` to ≈ [0, 1] (higher is better)."""
        ...


class RewardNotFound(InputError, KeyError):
    """Unknown reward name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class RewardBuildError(ScoreError):
    """A configured reward could not be built (bad weights, missing package, ...); names the reward.

    A :class:`~miroflow.data.score_tables.ScoreError`, so callers of the score stage catch one type.
    """
