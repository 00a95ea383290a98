"""open_clip rewards: CLIP score, HPSv2 and the LAION aesthetic predictor (see :mod:`miroflow.rewards.models`).

Each reward wraps an already built :class:`OpenClipTowers` (so tests can build the same
architecture from a tiny config with random weights); the registered factories load the real
checkpoint from ``weights`` (a local path or a hub id) on ``device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from miroflow.rewards.loading import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MissingWeightsError,
    check_batch,
    checkpoint_id,
    clip_preprocess,
    is_local_spec,
    load_state_dict,
    local_or_hub_file,
    missing_weights,
    pair_size,
    resolve_device,
)
from miroflow.rewards.registry import register_reward

if TYPE_CHECKING:  # pragma: no cover
    import open_clip

__all__ = [
    "HPS_CHECKPOINTS",
    "OpenClipTowers",
    "build_tiny_open_clip",
    "load_open_clip",
    "ClipScoreReward",
    "HPSv2Reward",
    "AestheticHead",
    "LaionAestheticReward",
]

HPS_CHECKPOINTS: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
"""HPSv2 version → checkpoint file name in the ``xswu/HPSv2`` hub repository."""


class OpenClipTowers:
    """An open_clip model with its tokenizer and preprocessing constants.

    ``image_features(images [B, 3, H, W] in [0, 1]) -> [B, D]`` and ``text_features(prompts) -> [B, D]``
    return L2-normalised embeddings (float32, on ``device``).
    """

    def __init__(
        self,
        model: open_clip.CLIP | nn.Module,
        tokenizer: Any,
        *,
        device: str | torch.device | None = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        visual = model.visual
        self.image_size: tuple[int, int] = pair_size(getattr(visual, "image_size"))
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(mean or pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.std = tuple(std or pp.get("std") or getattr(visual, "image_std", None) or OPENAI_CLIP_STD)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → ``[B, 3, S, S]`` normalised tower input on ``device``."""
        return clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        """``exp(model.logit_scale)`` (100 for trained CLIP checkpoints)."""
        return float(self.model.logit_scale.exp())


def build_tiny_open_clip(
    embed_dim: int = 64,
    vision_cfg: dict[str, Any] | None = None,
    text_cfg: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """A random-weight ``open_clip.CLIP`` from a (by default tiny, 64-px) config, with its tokenizer.

    Used by tests and demos: same architecture family as ViT-L/H-14, no weights needed.
    """
    import open_clip  # heavy (seconds to import): only when a model is built

    vcfg = dict(image_size=64, layers=2, width=64, patch_size=16, head_width=32)
    vcfg.update(vision_cfg or {})
    tcfg = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)
    tcfg.update(text_cfg or {})
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vcfg, text_cfg=tcfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=int(tcfg["context_length"]))
    return model, tokenizer


def load_open_clip(
    name: str, weights: str | None, model_name: str, device: torch.device, example: str
) -> tuple[nn.Module, Any]:
    """Build open_clip ``model_name`` and load ``weights`` (local checkpoint or hub id) for reward ``name``.

    Returns:
        ``(model on device, tokenizer)``.

    Raises:
        MissingWeightsError: ``weights`` is None, missing, or the hub model cannot be loaded.
        ValueError: the checkpoint does not fit ``model_name``.
    """
    if weights is None:
        raise missing_weights(name, f"an open_clip {model_name} checkpoint", example)
    import open_clip  # heavy (seconds to import): only when a model is built

    if weights.startswith("hf-hub:") or not is_local_spec(weights):
        hub = weights if weights.startswith("hf-hub:") else f"hf-hub:{weights}"
        try:
            model = open_clip.create_model(hub, device=device)
        except Exception as err:
            raise MissingWeightsError(
                f"reward {name!r}: cannot load open_clip model {hub!r} ({type(err).__name__}: {err}); "
                f"set score.reward_weights.{name} in params.yaml to a local checkpoint file"
            ) from err
        return model, open_clip.get_tokenizer(hub)
    path = local_or_hub_file(name, weights, "open_clip_pytorch_model.bin")
    model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    try:  # open_clip's own loader: unwraps state_dict/module., converts legacy layouts; weights_only
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except (RuntimeError, KeyError, StopIteration) as err:
        raise ValueError(f"reward {name!r}: checkpoint {path} does not fit open_clip {model_name}: {err}") from err
    return model.to(device), open_clip.get_tokenizer(model_name)


class ClipScoreReward:
    """CLIP score with open_clip: raw = ``100 · max(cos(img, txt), 0)``; normalize = raw / 100."""

    name = "clip_score"
    uses_prompt = True

    def __init__(self, towers: OpenClipTowers, *, version: str = "clip_score:random") -> None:
        self.towers = towers
        self.version = version

    @classmethod
    def from_config(cls, device: str | torch.device | None = "cpu", **cfg: Any) -> ClipScoreReward:
        """Random-weight model from a tiny config (see :func:`build_tiny_open_clip`)."""
        model, tok = build_tiny_open_clip(**cfg)
        return cls(OpenClipTowers(model, tok, device=device), version="clip_score:tiny-random")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw CLIP scores ``[B]`` (float32, CPU) in [0, 100]."""
        check_batch(images, prompts)
        with torch.inference_mode():
            cos = (self.towers.image_features(images) * self.towers.text_features(prompts)).sum(-1)
            return (100.0 * cos.clamp_min(0.0)).float().cpu()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw / 100, 0, 1)``."""
        return (raw.to(torch.float32) / 100.0).clamp(0.0, 1.0)


class HPSv2Reward:
    """HPSv2 (open_clip ViT-H-14 fine-tuned on human preferences): raw = ``cos(img, txt)``.

    This is the value the HPSv2 package returns (≈ 0.2–0.35 on real images; papers print ×100).
    normalize = ``clip(raw, 0, 1)`` (i.e. the 100·cos logit ÷ 100, like the other CLIP-type rewards).
    ``version`` records the HPS version and checkpoint (v2.1 for training, v2.0 for evaluation).
    """

    name = "hpsv2"
    uses_prompt = True

    def __init__(self, towers: OpenClipTowers, *, version: str = "hpsv2:random") -> None:
        self.towers = towers
        self.version = version

    @classmethod
    def from_config(cls, device: str | torch.device | None = "cpu", **cfg: Any) -> HPSv2Reward:
        """Random-weight model from a tiny config (see :func:`build_tiny_open_clip`)."""
        model, tok = build_tiny_open_clip(**cfg)
        return cls(OpenClipTowers(model, tok, device=device), version="hpsv2:tiny-random")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw HPS scores ``[B]`` (cosine similarity, float32, CPU)."""
        check_batch(images, prompts)
        with torch.inference_mode():
            cos = (self.towers.image_features(images) * self.towers.text_features(prompts)).sum(-1)
            return cos.float().cpu()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw, 0, 1)``."""
        return raw.to(torch.float32).clamp(0.0, 1.0)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP; ``forward([B, in_dim]) -> [B, 1]``.

    Layer indices match the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict
    (``layers.{0,2,4,6,7}``), so it loads directly.
    """

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Aesthetic score ``[B, 1]`` (≈ 1–10) of L2-normalised embeddings ``[B, in_dim]``."""
        return self.layers(emb)

    @classmethod
    def from_file(cls, path: str) -> AestheticHead:
        """Load head weights from ``.safetensors`` or ``.pth`` (``weights_only``); input dim inferred."""
        sd = load_state_dict(path)
        if "layers.0.weight" not in sd:
            raise ValueError(f"{path}: not a LAION aesthetic head (no 'layers.0.weight'); keys: {list(sd)[:5]}")
        head = cls(in_dim=int(sd["layers.0.weight"].shape[1]))
        head.load_state_dict(sd)
        return head


class LaionAestheticReward:
    """LAION aesthetic score: ``head(normalize(ViT-L-14 image embedding))``; normalize = raw / 10."""

    name = "laion_aesthetic"
    uses_prompt = False

    def __init__(self, towers: OpenClipTowers, head: AestheticHead, *, version: str = "laion_aesthetic:random") -> None:
        self.towers = towers
        self.head = head.to(towers.device).eval()
        self.version = version

    @classmethod
    def from_config(cls, device: str | torch.device | None = "cpu", **cfg: Any) -> LaionAestheticReward:
        """Random-weight tower (tiny config) + random head sized to its embedding."""
        model, tok = build_tiny_open_clip(**cfg)
        towers = OpenClipTowers(model, tok, device=device)
        head = AestheticHead(in_dim=int(model.text_projection.shape[1]))
        return cls(towers, head, version="laion_aesthetic:tiny-random")

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """Raw aesthetic scores ``[B]`` (float32, CPU; ≈ 1–10 with the released weights)."""
        with torch.inference_mode():
            return self.head(self.towers.image_features(images)).squeeze(-1).float().cpu()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw / 10, 0, 1)``."""
        return (raw.to(torch.float32) / 10.0).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------- factories
@register_reward("clip_score", needs_weights=True, uses_prompt=True)
def make_clip_score(
    weights: str | None = None, device: str | torch.device | None = "auto", model_name: str = "ViT-L-14"
) -> ClipScoreReward:
    """open_clip CLIP score. ``weights``: a local open_clip checkpoint of ``model_name``, or a hub id
    (``hf-hub:org/repo`` or ``org/repo`` holding an open_clip model, e.g. ``laion/CLIP-ViT-L-14-laion2B-s32B-b82K``)."""
    dev = resolve_device(device)
    model, tok = load_open_clip("clip_score", weights, model_name, dev, "laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    version = f"clip_score:{model_name}:{checkpoint_id(weights or '')}"
    return ClipScoreReward(OpenClipTowers(model, tok, device=dev), version=version)


@register_reward("laion_aesthetic", needs_weights=True, uses_prompt=False)
def make_laion_aesthetic(
    weights: str | None = None,
    device: str | torch.device | None = "auto",
    clip_weights: str | None = None,
    model_name: str = "ViT-L-14",
) -> LaionAestheticReward:
    """LAION aesthetic predictor. ``weights``: the MLP head (``.pth``/``.safetensors``), or a directory
    holding ``sac+logos+ava1-l14-linearMSE.pth`` (or ``aesthetic_head.safetensors``) and, unless
    ``clip_weights`` is given, the OpenAI ViT-L-14 weights as an open_clip state dict
    ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` (e.g. from the hub repo
    ``timm/vit_large_patch14_clip_224.openai``; OpenAI's TorchScript ``ViT-L-14.pt`` is not loaded,
    as it cannot be read with ``weights_only``)."""
    example = "/models/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    if weights is None:
        raise missing_weights("laion_aesthetic", "the aesthetic MLP head", example)
    head_path = weights
    if is_local_spec(weights) and Path(weights).expanduser().is_dir():
        d = Path(weights).expanduser()
        head_names = ["sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors", "aesthetic_head.pth"]
        head_path = _first_existing(d, head_names)
        if head_path is None:
            raise MissingWeightsError(
                "reward 'laion_aesthetic': no head file (sac+logos+ava1-l14-linearMSE.pth or "
                f"aesthetic_head.safetensors) in {d}; "
                "put it there or set score.reward_weights.laion_aesthetic to the head file"
            )
        if clip_weights is None:
            clip_weights = _first_existing(d, ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
    head = AestheticHead.from_file(local_or_hub_file("laion_aesthetic", head_path, "sac+logos+ava1-l14-linearMSE.pth"))
    if clip_weights is None:
        raise MissingWeightsError(
            "reward 'laion_aesthetic' needs the ViT-L-14 open_clip checkpoint: "
            "put open_clip_pytorch_model.bin next to the head "
            "(score.reward_weights.laion_aesthetic = that directory) or pass clip_weights"
        )
    dev = resolve_device(device)
    model, tok = load_open_clip("laion_aesthetic", clip_weights, model_name, dev, "openai ViT-L-14")
    version = f"laion_aesthetic:{checkpoint_id(head_path)}+{model_name}:{checkpoint_id(clip_weights)}"
    return LaionAestheticReward(OpenClipTowers(model, tok, device=dev), head, version=version)


def _first_existing(directory: Path, names: list[str]) -> str | None:
    for n in names:
        if (directory / n).is_file():
            return str(directory / n)
    return None


@register_reward("hpsv2", needs_weights=True, uses_prompt=True)
def make_hpsv2(
    weights: str | None = None,
    device: str | torch.device | None = "auto",
    version: str = "v2.1",
    model_name: str = "ViT-H-14",
) -> HPSv2Reward:
    """HPSv2. ``weights``: the HPS checkpoint (a file, a directory holding ``HPS_v2.1_compressed.pt``
    / ``HPS_v2_compressed.pt`` by ``version``, or the hub repo ``xswu/HPSv2``). ``version``:
    ``"v2.0"`` or ``"v2.1"``."""
    if version not in HPS_CHECKPOINTS:
        raise ValueError(f"hpsv2 version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}")
    filename = HPS_CHECKPOINTS[version]
    if weights is None:
        raise missing_weights("hpsv2", f"the HPS {version} checkpoint ({filename})", "xswu/HPSv2")
    path = local_or_hub_file("hpsv2", weights, filename)
    dev = resolve_device(device)
    model, tok = load_open_clip("hpsv2", path, model_name, dev, "xswu/HPSv2")
    tag = f"hpsv2-{version}:{model_name}:{Path(path).name}"
    return HPSv2Reward(OpenClipTowers(model, tok, device=dev), version=tag)
