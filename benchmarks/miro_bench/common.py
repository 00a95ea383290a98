"""Shared pieces of ``benchmarks/bench.py``: sizes, devices, side-by-side timing, the matmul reference, tables.

Every ratio the benchmark prints comes from :func:`alternate`: the variants being compared run in
alternating blocks (ABC, CBA, ABC, ...) in one process, so a load spike on this noisy machine lands
on all of them alike; each variant's time is the sum over its blocks, and the spread of the
per-block ratios is reported next to the ratio as a noise indicator.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SIZES",
    "BenchFailure",
    "Row",
    "Section",
    "SizeSpec",
    "Timing",
    "alternate",
    "check",
    "matmul_block",
    "peak_mem_gib",
    "resolve_device",
    "sync",
]


class BenchFailure(RuntimeError):
    """A correctness check failed: the benchmark refuses to report numbers for a wrong computation."""


def check(ok: bool, what: str) -> None:
    """Raise :class:`BenchFailure` naming ``what`` unless ``ok``."""
    if not ok:
        raise BenchFailure(f"correctness check failed: {what}")


@dataclass(frozen=True)
class SizeSpec:
    """One benchmark size.

    Attributes:
        name: ``tiny`` (CPU, the demo's model) or ``paper`` (the paper's ≈ 371M MMDiT, GPU).
        resolution: data side in pixels (the shards the loader and the scorer read).
        samples, shard_size: the prepared dataset (``samples / shard_size`` shards).
        train_batch: global batch of the training step.
        blocks, block_steps: alternating blocks and training steps per block.
        sample_batch, sample_steps: prompts of the throughput run and Euler steps (50, the paper's).
        sample_blocks: alternating sampling blocks.
        score_batch: images per reward call.
        score_repeats: alternating scoring blocks.
        towers: open_clip tower configs of the scoring section, ``{reward: (model name | None, tiny cfg)}``.
    """

    name: str
    resolution: int
    samples: int
    shard_size: int
    train_batch: int
    blocks: int
    block_steps: int
    sample_batch: int
    sample_steps: int
    sample_blocks: int
    score_batch: int
    score_repeats: int
    matmul_n: int
    towers: dict[str, str | None] = field(default_factory=dict)


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        name="tiny",
        resolution=32,
        samples=1024,
        shard_size=256,
        train_batch=64,
        blocks=4,
        block_steps=4,
        sample_batch=64,
        sample_steps=50,
        sample_blocks=2,
        score_batch=64,
        score_repeats=3,
        matmul_n=1024,
        towers={"clip_score": None, "laion_aesthetic": None, "hpsv2": None},
    ),
    "paper": SizeSpec(
        name="paper",
        resolution=256,
        samples=512,
        shard_size=64,
        train_batch=128,
        blocks=4,
        block_steps=5,
        sample_batch=64,
        sample_steps=50,
        sample_blocks=2,
        score_batch=256,
        score_repeats=3,
        matmul_n=8192,
        towers={"clip_score": "ViT-L-14", "laion_aesthetic": "ViT-L-14", "hpsv2": "ViT-H-14"},
    ),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_gib(device: torch.device) -> float:
    """Peak allocated GiB on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(kib) * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


@dataclass
class Timing:
    """Seconds of each block of one variant and the units (images, steps...) it processed."""

    blocks: list[float] = field(default_factory=list)
    block_units: list[float] = field(default_factory=list)

    @property
    def units(self) -> float:
        """Units over all blocks."""
        return float(sum(self.block_units))

    @property
    def seconds(self) -> float:
        """Total seconds over all blocks."""
        return float(sum(self.blocks))

    @property
    def rate(self) -> float:
        """Units per second over all blocks."""
        return self.units / self.seconds if self.seconds > 0 else float("nan")


def alternate(
    variants: dict[str, Callable[[], float]], blocks: int, device: torch.device, warmup: bool = True
) -> dict[str, Timing]:
    """Run each variant once per block, alternating the order (forward, then reversed), synchronised.

    Args:
        variants: name -> a block: runs some work and returns the units it processed (images, FLOPs...).
        blocks: blocks per variant.
        device: synchronised around every block.
        warmup: run one untimed block of every variant first (allocator, caches, lazy init, compile).

    Returns:
        name -> :class:`Timing` (per-block seconds, total units).
    """
    names = list(variants)
    if warmup:
        for n in names:
            variants[n]()
    out = {n: Timing() for n in names}
    for b in range(blocks):
        for n in names if b % 2 == 0 else names[::-1]:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            units = variants[n]()
            sync(device)
            out[n].blocks.append(time.perf_counter() - t0)
            out[n].block_units.append(float(units))
    return out


def block_ratio_spread(a: Timing, b: Timing) -> tuple[float, float]:
    """(min, max) over blocks ``i`` of ``rate_i(a) / rate_i(b)``."""
    ratios = [
        (ua / ta) / (ub / tb)
        for ta, ua, tb, ub in zip(a.blocks, a.block_units, b.blocks, b.block_units)
        if ta > 0 and tb > 0 and ub > 0
    ]
    return (min(ratios), max(ratios)) if ratios else (math.nan, math.nan)


def matmul_block(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> Callable[[], float]:
    """A block of ``reps`` square ``n×n @ n×n`` matmuls; returns the FLOPs it ran (``2n³`` each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run() -> float:
        for _ in range(reps):
            a @ b
        return 2.0 * n**3 * reps

    return run


@dataclass(frozen=True)
class Row:
    """One line of a section table: a ratio (or a rate) with what it compares and its goal."""

    name: str
    value: float
    unit: str = "x"
    detail: str = ""
    goal: str = ""


@dataclass
class Section:
    """A section's table and raw numbers."""

    title: str
    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, value: float, unit: str = "x", detail: str = "", goal: str = "") -> None:
        """Append a row."""
        self.rows.append(Row(name, float(value), unit, detail, goal))

    def table(self) -> str:
        """The section as a Markdown table (name | value | goal | detail)."""
        lines = [
            f"### {self.title} ({self.seconds:.0f} s)",
            "",
            "| measure | value | goal | detail |",
            "|---|---:|---|---|",
        ]
        for r in self.rows:
            v = _fmt(r.value, r.unit)
            lines.append(f"| {r.name} | {v} | {r.goal} | {r.detail} |")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Rows and raw numbers as plain JSON values."""
        return {
            "title": self.title,
            "seconds": self.seconds,
            "rows": [r.__dict__ for r in self.rows],
            "numbers": self.numbers,
            "notes": self.notes,
        }


def _fmt(v: float, unit: str) -> str:
    if not math.isfinite(v):
        return "n/a"
    if unit == "x":
        return f"{v:.3f}"
    if unit == "%":
        return f"{100 * v:.1f}%"
    digits = 0 if abs(v) >= 100 else 2 if abs(v) >= 1 else 4
    return f"{v:,.{digits}f} {unit}"


def spread(a: Timing, b: Timing) -> str:
    """``blocks a..b`` text of the per-block rate ratio a/b."""
    lo, hi = block_ratio_spread(a, b)
    return f"per block {lo:.2f}-{hi:.2f}"


def names_of(items: Sequence[Any]) -> str:
    """Comma-joined ``name`` attributes."""
    return ", ".join(str(getattr(i, "name", i)) for i in items)
