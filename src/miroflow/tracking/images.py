"""Readable image cards for MLflow: small samples upscaled (nearest) with their prompt under each."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MIN_CELL", "captioned_grid"]

#: Smallest side (pixels) of one upscaled sample in a logged grid.
MIN_CELL = 128
_PAD = 4
_FONT_SIZE = 11
_MAX_LINES = 3

FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=1)
def _font() -> FontType:
    """Pillow's bundled font at 11 px (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (ImportError, OSError, TypeError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: FontType, max_lines: int = _MAX_LINES) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels, at most ``max_lines`` lines (the last ends in "...")."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    out = []
    for ln in lines:  # a single word wider than the cell: cut it
        while font.getlength(ln) > width and len(ln) > 4:
            ln = ln[:-4] + "..."
        out.append(ln)
    return out


def _as_uint8_nhwc(images: Any) -> np.ndarray:
    """``[N, 3, H, W]`` / ``[N, H, W, 3]`` floats in [0, 1] or uint8 (numpy or CPU tensor) -> uint8 ``[N, H, W, 3]``."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[-1]) or arr.shape[0] == 0:
        raise ValueError(f"captioned_grid: images must have shape [N, 3, H, W] or [N, H, W, 3], got {arr.shape}")
    if arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError(f"captioned_grid: images of shape {arr.shape} contain NaN or inf")
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return arr


def captioned_grid(images: Any, captions: Sequence[str], min_cell: int = MIN_CELL, columns: int = 8) -> np.ndarray:
    """One row of samples per ``columns`` images, each upscaled by an integer factor (nearest) to at least
    ``min_cell`` pixels a side, its caption (word-wrapped, at most 3 lines) under it, on white.

    Args:
        images: ``[N, 3, H, W]`` or ``[N, H, W, 3]``, floats in [0, 1] or uint8.
        captions: N strings (e.g. the prompts).
        min_cell: smallest side of an upscaled sample in pixels.
        columns: samples per row.

    Returns:
        uint8 ``[rows·(k·H + caption + pad) + pad, cols·(k·W + pad) + pad, 3]`` with ``k = ceil(min_cell / min(H, W))``.

    Raises:
        ValueError: a wrong shape, NaN/inf values, or a caption count other than N (names both).
    """
    arr = _as_uint8_nhwc(images)
    n, h, w, _ = arr.shape
    if len(captions) != n:
        raise ValueError(f"captioned_grid: {len(captions)} captions for {n} images")
    if min_cell < 1 or columns < 1:
        raise ValueError(f"captioned_grid: min_cell and columns must be >= 1, got {min_cell}, {columns}")
    k = max(1, math.ceil(min_cell / min(h, w)))
    ch, cw = h * k, w * k
    font = _font()
    wrapped = [_wrap(str(c), cw, font) for c in captions]
    line_h = int(font.getbbox("Ag")[3]) + 2
    cap_h = max(len(lines) for lines in wrapped) * line_h + _PAD
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * (cw + _PAD) + _PAD, rows * (ch + cap_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x = _PAD + (i % cols) * (cw + _PAD)
        y = _PAD + (i // cols) * (ch + cap_h + _PAD)
        canvas.paste(Image.fromarray(arr[i]).resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + ch + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)
