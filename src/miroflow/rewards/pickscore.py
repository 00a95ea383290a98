"""PickScore through transformers' ``CLIPModel`` (see :mod:`miroflow.rewards.models` for the formula)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from miroflow.rewards.loading import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MissingWeightsError,
    check_batch,
    checkpoint_id,
    clip_preprocess,
    is_local_spec,
    missing_weights,
    pair_size,
    resolve_device,
)
from miroflow.rewards.registry import register_reward

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = ["PickScoreReward"]


class PickScoreReward:
    """PickScore (transformers ``CLIPModel``): raw = ``logit_scale.exp() · cos(img, txt)``.

    normalize = ``clip(raw / 100, 0, 1)``. Preprocessing follows the checkpoint's image processor
    config (shortest-edge resize, center crop, mean/std) on tensors; text goes through its tokenizer
    with padding and truncation to the text tower's length.
    """

    name = "pickscore"
    uses_prompt = True

    def __init__(
        self,
        model: transformers.CLIPModel,
        tokenizer: Any,
        *,
        resize_shorter: int,
        crop_size: tuple[int, int],
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        device: str | torch.device | None = "cpu",
        version: str = "pickscore:random",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.resize_shorter = int(resize_shorter)
        self.crop_size = pair_size(crop_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.version = version
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        processor_path: str | None = None,
        device: str | torch.device | None = "cpu",
        version: str | None = None,
    ) -> PickScoreReward:
        """Load model, image-processor config and tokenizer with ``from_pretrained``.

        Local directories are read with ``local_files_only=True`` (never a download).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel  # heavy: start-up time

        proc = processor_path or path
        model = CLIPModel.from_pretrained(path, local_files_only=is_local_spec(path))
        proc_local = is_local_spec(proc)
        image_processor = AutoImageProcessor.from_pretrained(proc, local_files_only=proc_local)
        tokenizer = AutoTokenizer.from_pretrained(proc, local_files_only=proc_local)
        size = image_processor.size
        shorter = int(size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224)))
        crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", True) else None
        crop_hw = (int(crop["height"]), int(crop["width"])) if crop else (shorter, shorter)
        return cls(
            model,
            tokenizer,
            resize_shorter=shorter,
            crop_size=crop_hw,
            mean=image_processor.image_mean,
            std=image_processor.image_std,
            device=device,
            version=version or f"pickscore:{checkpoint_id(path)}",
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → ``pixel_values [B, 3, h, w]`` on ``device``."""
        return clip_preprocess(images.to(self.device), self.crop_size, self.mean, self.std, self.resize_shorter)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenizer output (``input_ids``, ``attention_mask``, each ``[B, L]``) on ``device``."""
        enc = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw PickScores ``[B]`` (float32, CPU)."""
        check_batch(images, prompts)
        with torch.inference_mode():
            img = _features(self.model.get_image_features(pixel_values=self.preprocess(images)))
            txt = _features(self.model.get_text_features(**self.tokenize(prompts)))
            cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
            return (self.model.logit_scale.exp().float() * cos).cpu()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw / 100, 0, 1)``."""
        return (raw.to(torch.float32) / 100.0).clamp(0.0, 1.0)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or a model output (newer); take the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected feature output {type(out).__name__}")


@register_reward("pickscore", needs_weights=True, uses_prompt=True)
def make_pickscore(
    weights: str | None = None, device: str | torch.device | None = "auto", processor: str | None = None
) -> PickScoreReward:
    """PickScore v1. ``weights``: a local ``save_pretrained`` directory or hub id of the CLIPModel
    (``yuvalkirstain/PickScore_v1``); ``processor``: where the tokenizer + image processor live
    (default: ``weights``; the reference uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    if weights is None:
        raise missing_weights("pickscore", "a CLIPModel checkpoint", "yuvalkirstain/PickScore_v1")
    for spec in (weights, processor):
        if spec is not None and is_local_spec(spec) and not Path(spec).expanduser().exists():
            raise MissingWeightsError(
                f"reward 'pickscore': weights directory not found: {spec} "
                "(set score.reward_weights.pickscore in params.yaml "
                "to a save_pretrained directory or a hub id)"
            )
    return PickScoreReward.from_pretrained(weights, processor_path=processor, device=device)
