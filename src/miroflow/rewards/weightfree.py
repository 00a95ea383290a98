"""Weight-free image rewards: sharpness, noise, contrast, compressibility.

All four are image-only (``uses_prompt = False``), deterministic and need no model weights. They are
designed to *agree on clean images* (docs/design.md §4): a clean render (flat colours, hard edges, full
contrast, no artefacts) scores near the top of every one, and each drops under its matching
degradation without being inflated by the others. In particular additive noise does not raise
``sharpness`` or ``contrast``: both subtract the energy that the measured noise level explains.

Shared building blocks (all batched torch on CPU, float32):

* luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (Rec. 601), ``[B, H, W]`` in [0, 1];
* ``median3x3``: exact 3×3 median filter (separable min/max selection) with reflect padding;
* ``noise_sigma``: robust residual sigma ``σ̂ = 1.4826 · median|Y − median3x3(Y)| / c``, where
  ``c = _MAD_GAUSS_GAIN`` calibrates it so that i.i.d. Gaussian noise of standard deviation σ on a
  flat image gives ``σ̂ ≈ σ`` (units: luminance, [0, 1] scale). A median over pixels ignores the few
  edge/corner pixels where the median filter itself changes a clean image, so a clean render has
  ``σ̂ ≈ 0``.

Reward definitions (raw units; ``normalize`` is a fixed map clipped to [0, 1], higher better):

=================  ==========================================================  =====================
name               raw                                                         normalize
=================  ==========================================================  =====================
sharpness          ``sqrt(max(E|∇ med(Y)|² − κ·σ̂², 0))`` (forward differences,   ``raw / 0.20``
                   luminance per pixel; κ = ``SHARPNESS_NOISE_GAIN``)
noise              ``σ̂`` (luminance std; lower is cleaner)                      ``1 − raw / 0.25``
contrast           ``sqrt(max(Var(Y) − σ̂², 0))`` (noise-corrected RMS contrast)  ``raw / 0.30``
compressibility    JPEG (q=75, 4:4:4) entropy-coded bytes ÷ zlib-9 bytes of the
                   raw RGB (higher = flat colours + exact edges; see class doc)    ``ln(raw/0.1)/ln(50)``
=================  ==========================================================  =====================

The constants keep 32-px images in ≈ [0, 1] without clipping busy clean scenes. Sharpness and
contrast are content-dependent (more/larger objects → more edges and variance): on 64 clean
``miroflow.data.shapes`` renders at 32 px the normalised values are sharpness 0.16–0.54 and contrast
0.16–0.61 (10th–90th percentile), noise 1.0, compressibility 0.64–0.87. Quantile binning downstream
only needs the ordering; the constants only keep values in ≈ [0, 1]. Values depend on resolution
(per-pixel gradients), so compare rewards at one resolution.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from miroflow.rewards.registry import register_reward

__all__ = [
    "luminance",
    "median3x3",
    "noise_sigma",
    "SharpnessReward",
    "NoiseReward",
    "ContrastReward",
    "CompressibilityReward",
    "SHARPNESS_SCALE",
    "NOISE_SCALE",
    "CONTRAST_SCALE",
    "COMPRESSIBILITY_RANGE",
    "JPEG_QUALITY",
]

_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
# 1 / Φ⁻¹(3/4): turns a median absolute deviation into a Gaussian standard deviation.
_MAD_TO_SIGMA = 1.4826
# For i.i.d. N(0, σ²) pixels, 1.4826·median|x − med3x3(x)| ≈ _MAD_GAUSS_GAIN · σ (measured on 2M px).
_MAD_GAUSS_GAIN = 0.8639
# For i.i.d. N(0, σ²) pixels, E|∇ med3x3(x)|² ≈ 0.284 · σ² (forward differences, measured). The
# gain used is ~1.5× that so that noise never *raises* sharpness (it also erodes real edges).
SHARPNESS_NOISE_GAIN = 0.40

SHARPNESS_SCALE = 0.20
"""Raw sharpness (RMS luminance gradient per pixel) mapped to 1.0."""
NOISE_SCALE = 0.25
"""Residual noise sigma (luminance) mapped to 0.0."""
CONTRAST_SCALE = 0.30
"""Noise-corrected luminance standard deviation mapped to 1.0."""
COMPRESSIBILITY_RANGE = (0.1, 5.0)
"""JPEG-bytes / lossless-bytes ratios mapped to 0.0 and 1.0 (log scale in between)."""
JPEG_QUALITY = 75
"""Fixed JPEG quality used by ``compressibility``."""


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``images [B, 3, H, W]`` and return them as contiguous float32 on CPU."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(f"images must be at least 2×2 pixels, got {tuple(images.shape[-2:])}")
    return images.detach().to(device="cpu", dtype=torch.float32).contiguous()


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luminance ``[B, H, W]`` (same [0, 1] scale) of RGB ``images [B, 3, H, W]``."""
    images = _check_images(images)
    return torch.einsum("bchw,c->bhw", images, _LUMA)


def _med3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise median of three tensors of one shape."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def median3x3(x: torch.Tensor) -> torch.Tensor:
    """Exact 3×3 median filter of ``x [B, H, W]`` with reflect padding; returns ``[B, H, W]``.

    Separable selection instead of ``unfold`` + ``median`` (≈ 20× faster on CPU): sort every vertical
    triple once (lo ≤ mid ≤ hi), then for each window the median of its 9 values is
    ``med3(max(lo), med3(mid), min(hi))`` over the three columns — about 20 elementwise min/max passes.
    """
    b, h, w = x.shape
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="reflect")[:, 0]  # [B, H+2, W+2]
    a0, a1, a2 = p[:, 0:h], p[:, 1 : h + 1], p[:, 2 : h + 2]  # vertical neighbours, [B, H, W+2]
    lo, hi = torch.minimum(a0, a1), torch.maximum(a0, a1)
    mid, hi = torch.minimum(hi, a2), torch.maximum(hi, a2)
    lo, mid = torch.minimum(lo, mid), torch.maximum(lo, mid)
    cols = (slice(0, w), slice(1, w + 1), slice(2, w + 2))
    lo_max = torch.maximum(torch.maximum(lo[..., cols[0]], lo[..., cols[1]]), lo[..., cols[2]])
    hi_min = torch.minimum(torch.minimum(hi[..., cols[0]], hi[..., cols[1]]), hi[..., cols[2]])
    mid_med = _med3(mid[..., cols[0]], mid[..., cols[1]], mid[..., cols[2]])
    return _med3(lo_max, mid_med, hi_min)


def noise_sigma(y: torch.Tensor, med: torch.Tensor | None = None) -> torch.Tensor:
    """Robust noise standard deviation ``[B]`` of luminance ``y [B, H, W]`` (see module docstring).

    ``med`` may pass a precomputed ``median3x3(y)``.
    """
    if med is None:
        med = median3x3(y)
    resid = (y - med).abs().flatten(1)
    return resid.median(dim=1).values * (_MAD_TO_SIGMA / _MAD_GAUSS_GAIN)


def _gradient_energy(m: torch.Tensor) -> torch.Tensor:
    """Mean squared forward-difference gradient ``[B]`` of ``m [B, H, W]`` (luminance² per px²)."""
    gx = m[:, :, 1:] - m[:, :, :-1]
    gy = m[:, 1:, :] - m[:, :-1, :]
    return gx.pow(2).mean(dim=(1, 2)) + gy.pow(2).mean(dim=(1, 2))


class _WeightFree:
    """Common plumbing: image-only, CPU, returns float32 ``[B]``."""

    name: str = ""
    version: str = ""
    uses_prompt: bool = False

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """Raw scores ``[B]`` (float32, CPU) of ``images [B, 3, H, W]`` in [0, 1]; prompts ignored."""
        with torch.inference_mode():
            return self._raw(_check_images(images)).to(torch.float32).cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r})"


class SharpnessReward(_WeightFree):
    """Noise-robust edge strength (higher = sharper).

    raw = ``sqrt(max(E|∇ median3x3(Y)|² − κ·σ̂², 0))`` in luminance per pixel, where the median
    filter removes most noise while keeping step edges, and ``κ·σ̂²`` removes the gradient energy
    the residual noise would still add. normalize = ``clip(raw / 0.20, 0, 1)``.
    """

    name = "sharpness"
    version = "sharpness-v1"

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        y = luminance(images)
        med = median3x3(y)
        sigma = noise_sigma(y, med)
        energy = _gradient_energy(med) - SHARPNESS_NOISE_GAIN * sigma.pow(2)
        return energy.clamp_min(0).sqrt()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw / SHARPNESS_SCALE, 0, 1)``; same shape as ``raw``."""
        return (raw.to(torch.float32) / SHARPNESS_SCALE).clamp(0.0, 1.0)


class NoiseReward(_WeightFree):
    """Residual noise level: raw = ``σ̂`` (luminance std, lower = cleaner).

    normalize = ``clip(1 − raw / 0.25, 0, 1)`` (decreasing, so higher normalised = cleaner).
    """

    name = "noise"
    version = "noise-v1"

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        return noise_sigma(luminance(images))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(1 − raw / NOISE_SCALE, 0, 1)``; same shape as ``raw``."""
        return (1.0 - raw.to(torch.float32) / NOISE_SCALE).clamp(0.0, 1.0)


class ContrastReward(_WeightFree):
    """Noise-corrected RMS luminance contrast (higher = more contrast).

    raw = ``sqrt(max(Var(Y) − σ̂², 0))`` (luminance std over the image): additive noise of variance σ²
    adds σ² to Var(Y), which the subtraction removes, so noise does not pass for contrast.
    normalize = ``clip(raw / 0.30, 0, 1)``.
    """

    name = "contrast"
    version = "contrast-v1"

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        y = luminance(images)
        var = y.flatten(1).var(dim=1, unbiased=False)
        return (var - noise_sigma(y).pow(2)).clamp_min(0).sqrt()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(raw / CONTRAST_SCALE, 0, 1)``; same shape as ``raw``."""
        return (raw.to(torch.float32) / CONTRAST_SCALE).clamp(0.0, 1.0)


def jpeg_payload_bytes(image_hwc: np.ndarray, quality: int = JPEG_QUALITY) -> int:
    """Entropy-coded size in bytes of ``image_hwc [H, W, 3] uint8`` as baseline JPEG.

    Headers (quantisation and Huffman tables, ~600 bytes whatever the content) are excluded: only
    the bytes between the start-of-scan segment and the end-of-image marker count. Chroma is not
    subsampled (4:4:4) and the standard Huffman tables are used, so the size is deterministic.
    """
    buf = io.BytesIO()
    Image.fromarray(image_hwc, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    data = buf.getvalue()
    sos = data.find(b"\xff\xda")
    if sos < 0:  # pragma: no cover - PIL always writes a scan
        raise RuntimeError("JPEG encoder produced no start-of-scan marker")
    header_len = int.from_bytes(data[sos + 2 : sos + 4], "big")
    return len(data) - (sos + 2 + header_len) - 2  # minus the EOI marker


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] → ``[B, H, W, 3]`` uint8 (round to nearest)."""
    return (images.clamp(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class CompressibilityReward(_WeightFree):
    """JPEG compressibility relative to lossless compressibility (higher = better).

    raw = ``jpeg_bytes / lossless_bytes``: the entropy-coded JPEG size at fixed quality
    ``JPEG_QUALITY`` (4:4:4, standard tables, headers excluded) divided by the zlib (level 9) size of
    the raw ``H·W·3`` uint8 bytes. Both are sizes relative to the same raw size, so the ratio compares
    two compression ratios.

    Direction, and why not plain "JPEG size / raw size": on shapes renders a plain JPEG size ranks
    blurred, low-contrast and already-JPEG-degraded images as *more* compressible than clean ones
    and noisy images as less, so neither direction lets a clean image top it while agreeing with
    sharpness/contrast/noise (docs/design.md §4). The ratio does: a clean render (flat colours, exact
    edges) is very cheap for a lossless coder but its hard edges cost JPEG bits (raw ≈ 1–3), while
    blur gradients, noise and JPEG artefacts make lossless coding expensive and contrast loss makes
    only the JPEG cheaper (raw ≈ 0.1–0.6). It decreases monotonically as JPEG quality of the input
    goes from clean down to ≈ 10 and is flat (within per-image noise) below that. It measures how
    "clean-graphic" an image is, so it is meant for synthetic domains like shapes; on photographs
    it is uniformly low. normalize = ``clip(ln(raw / 0.1) / ln(50), 0, 1)`` (log scale: raw spans
    two decades; 0.1 → 0, 1 → 0.59, 5 → 1). Slower than the others (one JPEG
    encode and one zlib pass per image, ≈ 2–3k img/s at 32 px on one core).
    """

    name = "compressibility"
    version = "compressibility-v2"

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        arr = _to_uint8_hwc(images)
        out = torch.empty(arr.shape[0], dtype=torch.float32)
        for i, img in enumerate(arr):
            out[i] = jpeg_payload_bytes(img) / max(len(zlib.compress(img.tobytes(), 9)), 1)
        return out

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``clip(ln(raw / 0.1) / ln(5.0 / 0.1), 0, 1)``; same shape as ``raw``."""
        lo, hi = COMPRESSIBILITY_RANGE
        x = raw.to(torch.float32).clamp_min(1e-12)
        return (torch.log(x / lo) / math.log(hi / lo)).clamp(0.0, 1.0)


# ``device`` is accepted like every factory's and ignored (CPU); ``weights`` is refused by the registry.
@register_reward(SharpnessReward.name, needs_weights=False, uses_prompt=False, version=SharpnessReward.version)
def _make_sharpness(device: str | torch.device | None = None) -> SharpnessReward:
    """Factory for :class:`SharpnessReward`."""
    return SharpnessReward()


@register_reward(NoiseReward.name, needs_weights=False, uses_prompt=False, version=NoiseReward.version)
def _make_noise(device: str | torch.device | None = None) -> NoiseReward:
    """Factory for :class:`NoiseReward`."""
    return NoiseReward()


@register_reward(ContrastReward.name, needs_weights=False, uses_prompt=False, version=ContrastReward.version)
def _make_contrast(device: str | torch.device | None = None) -> ContrastReward:
    """Factory for :class:`ContrastReward`."""
    return ContrastReward()


@register_reward(
    CompressibilityReward.name, needs_weights=False, uses_prompt=False, version=CompressibilityReward.version
)
def _make_compressibility(device: str | torch.device | None = None) -> CompressibilityReward:
    """Factory for :class:`CompressibilityReward`."""
    return CompressibilityReward()
