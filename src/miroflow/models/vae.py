"""Latent codecs: images ``[B, 3, H, W]`` in ``[0, 1]`` <-> the space the denoiser models.

* :class:`PixelCodec` — identity up to an affine map ``[0, 1] -> [-1, 1]`` (tiny domains).
* :class:`VAECodec` — a frozen diffusers ``AutoencoderKL`` (e.g. the SDXL VAE) plus
  per-channel normalisation: ``z_norm = (z - mean_c) / std_c``. The stats come from
  :meth:`VAECodec.fit_stats` on raw latents of the training data and are stored as JSON; when
  none are loaded the VAE config's ``shift_factor``/``scaling_factor`` are used
  (``(z - shift) * scale``, SD's convention).

Encoding is deterministic by default: it takes ``latent_dist.mean`` (the posterior mode).
``sample=True`` draws ``mean + std·ε`` instead, with an optional ``torch.Generator`` for
reproducibility (the posterior noise acts as a mild augmentation).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from miroflow.models.text import load_pretrained

__all__ = ["LatentCodec", "PixelCodec", "VAECodec", "CODECS", "create_codec"]

CODECS: tuple[str, ...] = ("pixel", "vae")


@runtime_checkable
class LatentCodec(Protocol):
    """Maps images to normalised latents and back."""

    channels: int
    downsample: int

    def encode(self, images: Tensor) -> Tensor:
        """``images[B, 3, H, W]`` in ``[0, 1]`` -> latents ``[B, channels, H/downsample, W/downsample]``."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, channels, h, w]`` -> images ``[B, 3, h·downsample, w·downsample]`` in ``[0, 1]``."""
        ...


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] with values in [0, 1], got {tuple(images.shape)}")


class PixelCodec:
    """Pixel space: ``encode(x) = 2x - 1``, ``decode(z) = clamp((z + 1) / 2, 0, 1)``."""

    channels: int = 3
    downsample: int = 1
    name: str = "pixel"

    def encode(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, H, W]`` in ``[-1, 1]``."""
        _check_images(images)
        return images * 2.0 - 1.0

    def decode(self, latents: Tensor) -> Tensor:
        """``[B, 3, H, W]`` (≈ ``[-1, 1]``) -> ``[B, 3, H, W]`` in ``[0, 1]``."""
        if latents.dim() != 4 or latents.shape[1] != 3:
            raise ValueError(f"latents must have shape [B, 3, H, W], got {tuple(latents.shape)}")
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)


class VAECodec:
    """Frozen ``AutoencoderKL`` with per-channel latent normalisation.

    Args:
        path: local directory or hub id of a diffusers AutoencoderKL (``config.json`` +
            weights; a ``vae/`` subfolder of a pipeline directory works too).
        device: where the VAE runs.
        stats_path: optional JSON written by :meth:`save_stats`.
        sample: draw from the posterior instead of taking its mean (see module doc).
        dtype: VAE weight dtype (float32 default; the SDXL VAE overflows in fp16).
    """

    name: str = "vae"

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        stats_path: str | Path | None = None,
        sample: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers import AutoencoderKL  # lazy: diffusers takes seconds to import

        self.path = path
        self.device = torch.device(device)
        self.sample = sample
        subfolder = "vae" if (Path(path) / "vae" / "config.json").is_file() else None
        kwargs: dict[str, object] = {"torch_dtype": dtype}
        if subfolder:
            kwargs["subfolder"] = subfolder
        self.vae = load_pretrained(AutoencoderKL.from_pretrained, path, "VAE", **kwargs)
        self.vae.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels: int = int(cfg.latent_channels)
        self.downsample: int = 2 ** (len(cfg.block_out_channels) - 1)
        scale = float(cfg.scaling_factor) if getattr(cfg, "scaling_factor", None) else 1.0
        shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        # Per-channel stats, float32 [C]; default = the config's global shift/scale.
        self.mean = torch.full((self.channels,), shift, device=self.device)
        self.std = torch.full((self.channels,), 1.0 / scale, device=self.device)
        self.stats_source = "config"
        if stats_path is not None:
            self.load_stats(stats_path)

    # ---------------------------------------------------------------- raw
    @torch.no_grad()
    def encode_raw(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images[B, 3, H, W]`` in ``[0, 1]`` -> un-normalised latents ``[B, C, H/f, W/f]``."""
        _check_images(images)
        x = (images.to(self.device, self.vae.dtype) * 2.0 - 1.0).contiguous()
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mean
        return z.float()

    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images[B, 3, H, W]`` in ``[0, 1]`` -> the diagonal-Gaussian posterior's un-normalised
        ``(mean, std)``, each float32 ``[B, C, H/f, W/f]``.

        The embed stage stores both (docs/architecture.md, "Text-embedding sidecars") and training
        draws ``z = mean + std·ε`` per step, as ``latent_dist.sample()`` would.
        """
        _check_images(images)
        x = (images.to(self.device, self.vae.dtype) * 2.0 - 1.0).contiguous()
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode_raw(self, latents: Tensor) -> Tensor:
        """Un-normalised latents ``[B, C, h, w]`` -> images ``[B, 3, h·f, w·f]`` in ``[0, 1]``."""
        x = self.vae.decode(latents.to(self.device, self.vae.dtype)).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---------------------------------------------------------- normalised
    def _view(self, v: Tensor, like: Tensor) -> Tensor:
        return v.to(like.device, like.dtype).view(1, -1, 1, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images[B, 3, H, W]`` in ``[0, 1]`` -> normalised latents ``[B, C, H/f, W/f]``."""
        z = self.encode_raw(images, generator=generator)
        return (z - self._view(self.mean, z)) / self._view(self.std, z)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, C, h, w]`` -> images ``[B, 3, h·f, w·f]`` in ``[0, 1]``."""
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must have shape [B, {self.channels}, h, w], got {tuple(latents.shape)}")
        z = latents.float() * self._view(self.std, latents.float()) + self._view(self.mean, latents.float())
        return self.decode_raw(z)

    # --------------------------------------------------------------- stats
    def fit_stats(self, latent_batches: Iterable[Tensor]) -> dict[str, list[float]]:
        """Set per-channel mean/std from **raw** latents (batches of ``[B, C, h, w]``).

        Accumulates sums in float64 over every element; std is the population std. Returns
        ``{"mean": [...], "std": [...]}`` and makes :meth:`encode` use them.
        """
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for z in latent_batches:
            if z.dim() != 4 or z.shape[1] != self.channels:
                raise ValueError(f"latent batch must have shape [B, {self.channels}, h, w], got {tuple(z.shape)}")
            z64 = z.detach().to("cpu", torch.float64)
            total += z64.sum(dim=(0, 2, 3))
            total_sq += (z64 * z64).sum(dim=(0, 2, 3))
            count += z.shape[0] * z.shape[2] * z.shape[3]
        if count == 0:
            raise ValueError("fit_stats got no latents")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(1e-12)
        self.mean = mean.float().to(self.device)
        self.std = var.sqrt().float().to(self.device)
        self.stats_source = f"fit:{count}"
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def save_stats(self, path: str | Path) -> Path:
        """Write ``{"mean", "std", "channels", "source", "vae"}`` as JSON."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "channels": self.channels,
            "source": self.stats_source,
            "vae": str(self.path),
        }
        p.write_text(json.dumps(data, indent=2) + "\n")
        return p

    def load_stats(self, path: str | Path) -> None:
        """Read stats written by :meth:`save_stats`."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"VAE latent stats file not found: {p}")
        data = json.loads(p.read_text())
        mean, std = data.get("mean"), data.get("std")
        if (
            not isinstance(mean, list)
            or not isinstance(std, list)
            or len(mean) != self.channels
            or len(std) != self.channels
        ):
            raise ValueError(f"{p}: 'mean' and 'std' must be lists of {self.channels} floats")
        if min(std) <= 0:
            raise ValueError(f"{p}: 'std' must be positive")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.stats_source = str(data.get("source", p))


def create_codec(
    kind: Literal["pixel", "vae"] | str,
    vae_path: str | None = None,
    device: str | torch.device = "cpu",
    stats_path: str | Path | None = None,
    sample: bool = False,
) -> PixelCodec | VAECodec:
    """``'pixel'`` -> :class:`PixelCodec`; ``'vae'`` -> :class:`VAECodec` (needs ``vae_path``)."""
    if kind == "pixel":
        return PixelCodec()
    if kind == "vae":
        if not vae_path:
            raise ValueError("codec 'vae' needs vae_path (local directory or hub id of an AutoencoderKL)")
        return VAECodec(vae_path, device=device, stats_path=stats_path, sample=sample)
    raise ValueError(f"unknown codec {kind!r}; valid: {', '.join(CODECS)}")
