"""Real reward-model loaders: CLIP score, LAION aesthetic, PickScore, HPSv2, ImageReward.

Each reward is a class implementing :class:`miroflow.rewards.base.Reward` around an already built
model (so tests can build the same architecture from a tiny config with random weights), plus a
factory registered by name that loads the real checkpoint from ``weights`` (a local path or a hub
id) on ``device``. Heavy dependencies (open_clip, transformers, huggingface_hub, ImageReward) are
imported inside the functions that need them. Nothing is downloaded unless ``weights`` names a hub
id; ``weights=None`` is an error naming the ``score.reward_weights.<name>`` entry to set.

Scores and normalisation (DESIGN §3: aesthetic ÷ 10, ImageReward (r+2)/4, CLIP-type logits ÷ 100);
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

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from miroflow.rewards.base import register_reward

if TYPE_CHECKING:  # pragma: no cover
    import open_clip
    import transformers

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MissingWeightsError",
    "clip_preprocess",
    "resolve_device",
    "OpenClipTowers",
    "ClipScoreReward",
    "AestheticHead",
    "LaionAestheticReward",
    "PickScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "HPS_CHECKPOINTS",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

HPS_CHECKPOINTS: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
"""HPSv2 version → checkpoint file name in the ``xswu/HPSv2`` hub repository."""

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class MissingWeightsError(FileNotFoundError):
    """A reward's weights are not configured or not found; the message says how to provide them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'auto'``/``None`` → CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = tuple(size)
    return int(h), int(w)


def clip_preprocess(
    images: torch.Tensor,
    crop_size: int | Sequence[int],
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resize_shorter: int | None = None,
) -> torch.Tensor:
    """CLIP-style preprocessing on tensors.

    Args:
        images: ``[B, 3, H, W]`` float RGB in [0, 1] (any device).
        crop_size: output ``(h, w)`` (or one int for square) of the center crop, in pixels.
        mean, std: per-channel normalisation constants (in [0, 1] pixel units).
        resize_shorter: the shorter side is first resized to this (bicubic, antialiased, aspect
            kept); default ``min(crop_size)``, as CLIP's ``Resize(size) + CenterCrop(size)``.

    Returns:
        ``[B, 3, h, w]`` float32, ``(pixel − mean) / std``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    th, tw = _pair(crop_size)
    target = min(th, tw) if resize_shorter is None else int(resize_shorter)
    x = images.to(torch.float32)
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = target, max(target, int(target * w / h))
    else:
        nh, nw = max(target, int(target * h / w)), target
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)  # bicubic overshoot; PIL clips to the uint8 range the same way
    top = int(round((nh - th) / 2.0))
    left = int(round((nw - tw) / 2.0))
    if top < 0 or left < 0:
        x = F.pad(x, (max(-left, 0), max(tw - nw + left, 0), max(-top, 0), max(th - nh + top, 0)))
        top, left = max(top, 0), max(left, 0)
    x = x[..., top : top + th, left : left + tw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _missing(name: str, what: str, example: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"reward {name!r} needs {what}: set score.reward_weights.{name} in params.yaml "
        f"to a local path or a hub id (e.g. {example!r})"
    )


def _is_local_spec(spec: str) -> bool:
    """True when ``spec`` is meant as a filesystem path rather than a hub id ``org/repo[/file]``."""
    return (
        os.path.isabs(spec)
        or spec.startswith(("./", "../", "~", "."))
        or "/" not in spec
        or os.path.exists(os.path.expanduser(spec))
    )


def _local_or_hub_file(name: str, spec: str, default_filename: str | None) -> str:
    """Resolve ``spec`` (a local file/dir, ``org/repo`` or ``org/repo/file``) to a local file path.

    Local paths are never sent to the hub. Hub ids go through ``huggingface_hub.hf_hub_download``
    (cache first; honours ``HF_HUB_OFFLINE``).

    Raises:
        MissingWeightsError: the local file does not exist, or the hub file cannot be fetched.
    """
    if spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:") :]
    if _is_local_spec(spec):
        p = Path(spec).expanduser()
        if p.is_dir():
            if default_filename is None:
                raise MissingWeightsError(f"reward {name!r}: {p} is a directory; point score.reward_weights.{name} at the checkpoint file")
            p = p / default_filename
        if not p.is_file():
            raise MissingWeightsError(
                f"reward {name!r}: weights file not found: {p} (set score.reward_weights.{name} in params.yaml to an existing file)"
            )
        return str(p)
    parts = spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
    if not filename:
        raise MissingWeightsError(f"reward {name!r}: hub id {spec!r} names no file; use 'org/repo/<file>'")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as err:  # network/offline/cache miss: say which file and how to provide it
        raise MissingWeightsError(
            f"reward {name!r}: cannot get {filename!r} from hub repo {repo_id!r} ({type(err).__name__}); "
            f"download it and set score.reward_weights.{name} in params.yaml to its local path"
        ) from err


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

    A ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are unwrapped.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _checkpoint_id(spec: str) -> str:
    """A machine-independent id for a weights spec: hub ids as given, local paths by file name."""
    if _is_local_spec(spec) and not spec.startswith("hf-hub:"):
        return Path(spec).name
    return spec


# ----------------------------------------------------------------------------------------- open_clip
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
        self.image_size: tuple[int, int] = _pair(getattr(visual, "image_size"))
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
    import open_clip

    vcfg = dict(image_size=64, layers=2, width=64, patch_size=16, head_width=32)
    vcfg.update(vision_cfg or {})
    tcfg = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)
    tcfg.update(text_cfg or {})
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vcfg, text_cfg=tcfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=int(tcfg["context_length"]))
    return model, tokenizer


def _load_open_clip(name: str, weights: str | None, model_name: str, device: torch.device, example: str) -> tuple[nn.Module, Any]:
    """Build ``model_name`` with open_clip and load ``weights`` (local checkpoint or hub id)."""
    if weights is None:
        raise _missing(name, f"an open_clip {model_name} checkpoint", example)
    import open_clip

    if weights.startswith("hf-hub:") or not _is_local_spec(weights):
        hub = weights if weights.startswith("hf-hub:") else f"hf-hub:{weights}"
        try:
            model = open_clip.create_model(hub, device=device)
        except Exception as err:
            raise MissingWeightsError(
                f"reward {name!r}: cannot load open_clip model {hub!r} ({type(err).__name__}: {err}); "
                f"set score.reward_weights.{name} in params.yaml to a local checkpoint file"
            ) from err
        return model, open_clip.get_tokenizer(hub)
    path = _local_or_hub_file(name, weights, "open_clip_pytorch_model.bin")
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
        _check_batch(images, prompts)
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
        _check_batch(images, prompts)
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
        sd = _load_state_dict(path)
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


# ----------------------------------------------------------------------------------------- transformers
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
        self.crop_size = _pair(crop_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.version = version
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, path: str, processor_path: str | None = None, device: str | torch.device | None = "cpu", version: str | None = None
    ) -> PickScoreReward:
        """Load model, image-processor config and tokenizer with ``from_pretrained``.

        Local directories are read with ``local_files_only=True`` (never a download).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        proc = processor_path or path
        model = CLIPModel.from_pretrained(path, local_files_only=_is_local_spec(path))
        proc_local = _is_local_spec(proc)
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
            version=version or f"pickscore:{_checkpoint_id(path)}",
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → ``pixel_values [B, 3, h, w]`` on ``device``."""
        return clip_preprocess(images.to(self.device), self.crop_size, self.mean, self.std, self.resize_shorter)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenizer output (``input_ids``, ``attention_mask``, each ``[B, L]``) on ``device``."""
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw PickScores ``[B]`` (float32, CPU)."""
        _check_batch(images, prompts)
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


# ----------------------------------------------------------------------------------------- ImageReward
class ImageRewardReward:
    """ImageReward v1.0 (optional package ``image-reward``); normalize = ``(raw + 2) / 4``."""

    name = "image_reward"
    uses_prompt = True

    def __init__(self, model: Any, *, version: str = "image_reward:ImageReward-v1.0") -> None:
        self.model = model
        self.version = version

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw ImageReward scores ``[B]`` (float32, CPU), one PIL conversion per image."""
        _check_batch(images, prompts)
        from PIL import Image

        arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        with torch.inference_mode():
            vals = [float(self.model.score(p, Image.fromarray(a))) for p, a in zip(prompts, arr)]
        return torch.tensor(vals, dtype=torch.float32)

    @staticmethod
    def normalize(raw: torch.Tensor) -> torch.Tensor:
        """``clip((raw + 2) / 4, 0, 1)``."""
        return ((raw.to(torch.float32) + 2.0) / 4.0).clamp(0.0, 1.0)


def _check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


# ----------------------------------------------------------------------------------------- factories
@register_reward("clip_score")
def make_clip_score(
    weights: str | None = None, device: str | torch.device | None = "auto", model_name: str = "ViT-L-14"
) -> ClipScoreReward:
    """open_clip CLIP score. ``weights``: a local open_clip checkpoint of ``model_name``, or a hub id
    (``hf-hub:org/repo`` or ``org/repo`` holding an open_clip model, e.g. ``laion/CLIP-ViT-L-14-laion2B-s32B-b82K``)."""
    dev = resolve_device(device)
    model, tok = _load_open_clip("clip_score", weights, model_name, dev, "laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    return ClipScoreReward(OpenClipTowers(model, tok, device=dev), version=f"clip_score:{model_name}:{_checkpoint_id(weights or '')}")


@register_reward("laion_aesthetic")
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
        raise _missing("laion_aesthetic", "the aesthetic MLP head", example)
    head_path = weights
    if _is_local_spec(weights) and Path(weights).expanduser().is_dir():
        d = Path(weights).expanduser()
        head_path = _first_existing(d, ["sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors", "aesthetic_head.pth"])
        if head_path is None:
            raise MissingWeightsError(
                f"reward 'laion_aesthetic': no head file (sac+logos+ava1-l14-linearMSE.pth or aesthetic_head.safetensors) in {d}; "
                "put it there or set score.reward_weights.laion_aesthetic to the head file"
            )
        if clip_weights is None:
            clip_weights = _first_existing(d, ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
    head = AestheticHead.from_file(_local_or_hub_file("laion_aesthetic", head_path, "sac+logos+ava1-l14-linearMSE.pth"))
    if clip_weights is None:
        raise MissingWeightsError(
            "reward 'laion_aesthetic' needs the ViT-L-14 open_clip checkpoint: put open_clip_pytorch_model.bin next to the head "
            "(score.reward_weights.laion_aesthetic = that directory) or pass clip_weights"
        )
    dev = resolve_device(device)
    model, tok = _load_open_clip("laion_aesthetic", clip_weights, model_name, dev, "openai ViT-L-14")
    version = f"laion_aesthetic:{_checkpoint_id(head_path)}+{model_name}:{_checkpoint_id(clip_weights)}"
    return LaionAestheticReward(OpenClipTowers(model, tok, device=dev), head, version=version)


def _first_existing(directory: Path, names: list[str]) -> str | None:
    for n in names:
        if (directory / n).is_file():
            return str(directory / n)
    return None


@register_reward("pickscore")
def make_pickscore(
    weights: str | None = None, device: str | torch.device | None = "auto", processor: str | None = None
) -> PickScoreReward:
    """PickScore v1. ``weights``: a local ``save_pretrained`` directory or hub id of the CLIPModel
    (``yuvalkirstain/PickScore_v1``); ``processor``: where the tokenizer + image processor live
    (default: ``weights``; the reference uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    if weights is None:
        raise _missing("pickscore", "a CLIPModel checkpoint", "yuvalkirstain/PickScore_v1")
    for spec in (weights, processor):
        if spec is not None and _is_local_spec(spec) and not Path(spec).expanduser().exists():
            raise MissingWeightsError(
                f"reward 'pickscore': weights directory not found: {spec} (set score.reward_weights.pickscore in params.yaml "
                "to a save_pretrained directory or a hub id)"
            )
    return PickScoreReward.from_pretrained(weights, processor_path=processor, device=device)


@register_reward("hpsv2")
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
        raise _missing("hpsv2", f"the HPS {version} checkpoint ({filename})", "xswu/HPSv2")
    path = _local_or_hub_file("hpsv2", weights, filename)
    dev = resolve_device(device)
    model, tok = _load_open_clip("hpsv2", path, model_name, dev, "xswu/HPSv2")
    return HPSv2Reward(OpenClipTowers(model, tok, device=dev), version=f"hpsv2-{version}:{model_name}:{Path(path).name}")


@register_reward("image_reward")
def make_image_reward(weights: str | None = None, device: str | torch.device | None = "auto") -> ImageRewardReward:
    """ImageReward v1.0 through the optional ``image-reward`` package (``weights``: a local
    ``ImageReward.pt`` or the name ``ImageReward-v1.0``)."""
    try:
        import ImageReward as image_reward_pkg  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            "reward 'image_reward' needs the optional package 'image-reward': pip install miroflow[imagereward]"
        ) from err
    if weights is None:
        raise _missing("image_reward", "an ImageReward checkpoint", "ImageReward-v1.0")
    if _is_local_spec(weights) and weights != "ImageReward-v1.0" and not Path(weights).expanduser().is_file():
        raise MissingWeightsError(f"reward 'image_reward': weights file not found: {weights} (set score.reward_weights.image_reward)")
    dev = resolve_device(device)
    model = image_reward_pkg.load(weights, device=str(dev))
    return ImageRewardReward(model, version=f"image_reward:{_checkpoint_id(weights)}")
