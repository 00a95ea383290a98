"""Real reward models: CLIP score, LAION aesthetic, PickScore, HPSv2, ImageReward (one import for all).

The code lives per family: :mod:`~miroflow.rewards.clip_models` (open_clip: CLIP score, HPSv2,
LAION aesthetic), :mod:`~miroflow.rewards.pickscore` (transformers), :mod:`~miroflow.rewards.image_reward`
(optional ``image-reward`` package), with shared weights/preprocessing helpers in
:mod:`~miroflow.rewards.loading`. Each reward is a class implementing :class:`miroflow.rewards.Reward`
around an already built model (so tests can build the same architecture from a tiny config with
random weights), plus a factory registered by name (``needs_weights=True``) that loads the real
checkpoint from ``weights`` (a local path or a hub id) on ``device``. Heavy dependencies (open_clip,
transformers, huggingface_hub, ImageReward) are imported inside the functions that need them.
Nothing is downloaded unless ``weights`` names a hub id; ``weights=None`` is an error naming the
``score.reward_weights.<name>`` entry to set.

Scores and normalisation (docs/design.md §3: aesthetic ÷ 10, ImageReward (r+2)/4, CLIP-type logits ÷ 100);
``cos`` is the cosine similarity of the L2-normalised image and text embeddings:

===============  =====================================================  ==========================
name             raw                                                    normalize (clip to [0, 1])
===============  =====================================================  ==========================
clip_score       ``100 · max(cos, 0)`` (CLIPScore with w = 1; equals the   ``raw / 100``
                 logit ``logit_scale · cos`` of standard CLIP checkpoints,
                 whose scale is 100, but does not depend on a checkpoint's
                 learned temperature)
laion_aesthetic  MLP head on the L2-normalised ViT-L-14 image embedding    ``raw / 10``
                 (≈ 1–10)
pickscore        ``logit_scale.exp() · cos`` (the PickScore formula; ≈ 100  ``raw / 100``
                 for the released checkpoint, so typical raw ≈ 18–24)
hpsv2            ``cos`` (what the HPSv2 library returns, ≈ 0.2–0.35;       ``raw`` (= 100·cos ÷ 100)
                 leaderboards print 100·cos)
image_reward     ImageReward v1.0 output (≈ standardised, mostly [−2, 2])   ``(raw + 2) / 4``
===============  =====================================================  ==========================

Image preprocessing runs on tensors (no PIL round trip): bicubic resize (antialiased) of the shorter
side to the tower's input size, center crop, clamp to [0, 1], per-channel mean/std (CLIP values
unless the checkpoint says otherwise). For square inputs this equals the reference pipelines.
"""

from miroflow.rewards.clip_models import (
    HPS_CHECKPOINTS,
    AestheticHead,
    ClipScoreReward,
    HPSv2Reward,
    LaionAestheticReward,
    OpenClipTowers,
    build_tiny_open_clip,
)
from miroflow.rewards.image_reward import ImageRewardReward
from miroflow.rewards.loading import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MissingWeightsError,
    clip_preprocess,
    resolve_device,
)
from miroflow.rewards.pickscore import PickScoreReward

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MissingWeightsError",
    "clip_preprocess",
    "resolve_device",
    "OpenClipTowers",
    "build_tiny_open_clip",
    "ClipScoreReward",
    "AestheticHead",
    "LaionAestheticReward",
    "PickScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "HPS_CHECKPOINTS",
]
