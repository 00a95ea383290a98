"""Reward protocol and registry.

Every reward scores a batch ``images: Tensor[B, 3, H, W]`` (float, RGB, values in [0, 1]) with
their ``prompts: list[str]`` (length B) and returns raw values ``Tensor[B]`` (float32, on CPU).
``normalize`` maps raw values to roughly [0, 1] (DESIGN §3) before binning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Reward", "get_reward_factory", "register_reward", "create_reward", "available_rewards", "RewardNotFound"]


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


RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


class RewardNotFound(KeyError):
    """Unknown reward name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering a factory ``(**kwargs) -> Reward`` under ``name``."""

    def deco(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _ensure_builtin() -> None:
    # Importing the package registers the built-in rewards (heavy deps stay lazy inside factories).
    import miroflow.rewards  # noqa: F401


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_reward_factory(name: str) -> RewardFactory:
    """The registered factory of ``name`` (to inspect its signature or return class).

    Raises:
        RewardNotFound: for an unknown name, listing the valid ones.
    """
    _ensure_builtin()
    if name not in _REGISTRY:
        raise RewardNotFound(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_reward(name: str, **kwargs: Any) -> Reward:
    """Build a reward by name. ``kwargs`` go to its factory (e.g. ``weights=``, ``device=``).

    Raises:
        RewardNotFound: for an unknown name, listing the valid ones.
    """
    _ensure_builtin()
    if name not in _REGISTRY:
        raise RewardNotFound(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
