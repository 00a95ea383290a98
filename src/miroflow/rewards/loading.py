"""Shared plumbing of the model rewards: devices, tensor preprocessing, and where weights come from.

Weights specs (``score.reward_weights.<name>``) are local paths or hub ids. Local paths are never
sent to the hub; a hub id goes through ``huggingface_hub`` (cache first; honours ``HF_HUB_OFFLINE``).
Nothing is downloaded unless a spec names a hub id; a missing spec is a :class:`MissingWeightsError`
naming the ``score.reward_weights.<name>`` entry to set.

Image preprocessing runs on tensors (no PIL round trip): bicubic resize (antialiased) of the shorter
side to the tower's input size, center crop, clamp to [0, 1], per-channel mean/std (CLIP values
unless the checkpoint says otherwise). For square inputs this equals the reference pipelines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from miroflow.errors import InputError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MissingWeightsError",
    "resolve_device",
    "pair_size",
    "clip_preprocess",
    "missing_weights",
    "is_local_spec",
    "local_or_hub_file",
    "load_state_dict",
    "checkpoint_id",
    "check_batch",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class MissingWeightsError(InputError, FileNotFoundError):
    """A reward's weights are not configured or not found; the message says how to provide them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'auto'``/``None`` → CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pair_size(size: int | Sequence[int]) -> tuple[int, int]:
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
    th, tw = pair_size(crop_size)
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


def missing_weights(name: str, what: str, example: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"reward {name!r} needs {what}: set score.reward_weights.{name} in params.yaml "
        f"to a local path or a hub id (e.g. {example!r})"
    )


def is_local_spec(spec: str) -> bool:
    """True when ``spec`` is meant as a filesystem path rather than a hub id ``org/repo[/file]``."""
    return (
        os.path.isabs(spec)
        or spec.startswith(("./", "../", "~", "."))
        or "/" not in spec
        or os.path.exists(os.path.expanduser(spec))
    )


def local_or_hub_file(name: str, spec: str, default_filename: str | None) -> str:
    """Resolve ``spec`` (a local file/dir, ``org/repo`` or ``org/repo/file``) to a local file path.

    Local paths are never sent to the hub. Hub ids go through ``huggingface_hub.hf_hub_download``
    (cache first; honours ``HF_HUB_OFFLINE``).

    Raises:
        MissingWeightsError: the local file does not exist, or the hub file cannot be fetched.
    """
    if spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:") :]
    if is_local_spec(spec):
        p = Path(spec).expanduser()
        if p.is_dir():
            if default_filename is None:
                raise MissingWeightsError(
                    f"reward {name!r}: {p} is a directory; point score.reward_weights.{name} at the checkpoint file"
                )
            p = p / default_filename
        if not p.is_file():
            raise MissingWeightsError(
                f"reward {name!r}: weights file not found: {p} "
                f"(set score.reward_weights.{name} in params.yaml to an existing file)"
            )
        return str(p)
    parts = spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
    if not filename:
        raise MissingWeightsError(f"reward {name!r}: hub id {spec!r} names no file; use 'org/repo/<file>'")
    from huggingface_hub import hf_hub_download  # optional dependency, imported only for hub ids (start-up time)

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as err:  # network/offline/cache miss: say which file and how to provide it
        raise MissingWeightsError(
            f"reward {name!r}: cannot get {filename!r} from hub repo {repo_id!r} ({type(err).__name__}); "
            f"download it and set score.reward_weights.{name} in params.yaml to its local path"
        ) from err


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

    A ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are unwrapped.
    """
    if path.endswith(".safetensors"):
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


def checkpoint_id(spec: str) -> str:
    """A machine-independent id for a weights spec: hub ids as given, local paths by file name."""
    if is_local_spec(spec) and not spec.startswith("hf-hub:"):
        return Path(spec).name
    return spec


def check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
