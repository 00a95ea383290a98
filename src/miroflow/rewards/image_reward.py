"""ImageReward v1.0 through the optional ``image-reward`` package (see :mod:`miroflow.rewards.models`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from miroflow.rewards.loading import (
    MissingWeightsError,
    check_batch,
    checkpoint_id,
    is_local_spec,
    missing_weights,
    resolve_device,
)
from miroflow.rewards.registry import register_reward

__all__ = ["ImageRewardReward"]


class ImageRewardReward:
    """ImageReward v1.0 (optional package ``image-reward``); normalize = ``(raw + 2) / 4``."""

    name = "image_reward"
    uses_prompt = True

    def __init__(self, model: Any, *, version: str = "image_reward:ImageReward-v1.0") -> None:
        self.model = model
        self.version = version

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw ImageReward scores ``[B]`` (float32, CPU), one PIL conversion per image."""
        check_batch(images, prompts)
        arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        with torch.inference_mode():
            vals = [float(self.model.score(p, Image.fromarray(a))) for p, a in zip(prompts, arr)]
        return torch.tensor(vals, dtype=torch.float32)

    @staticmethod
    def normalize(raw: torch.Tensor) -> torch.Tensor:
        """``clip((raw + 2) / 4, 0, 1)``."""
        return ((raw.to(torch.float32) + 2.0) / 4.0).clamp(0.0, 1.0)


@register_reward("image_reward", needs_weights=True, uses_prompt=True)
def make_image_reward(weights: str | None = None, device: str | torch.device | None = "auto") -> ImageRewardReward:
    """ImageReward v1.0 through the optional ``image-reward`` package (``weights``: a local
    ``ImageReward.pt`` or the name ``ImageReward-v1.0``)."""
    try:
        import ImageReward as image_reward_pkg  # type: ignore[import-not-found]  # optional dependency
    except ImportError as err:
        raise ImportError(
            "reward 'image_reward' needs the optional package 'image-reward': pip install miroflow[imagereward]"
        ) from err
    if weights is None:
        raise missing_weights("image_reward", "an ImageReward checkpoint", "ImageReward-v1.0")
    if is_local_spec(weights) and weights != "ImageReward-v1.0" and not Path(weights).expanduser().is_file():
        raise MissingWeightsError(
            f"reward 'image_reward': weights file not found: {weights} (set score.reward_weights.image_reward)"
        )
    dev = resolve_device(device)
    model = image_reward_pkg.load(weights, device=str(dev))
    return ImageRewardReward(model, version=f"image_reward:{checkpoint_id(weights)}")
