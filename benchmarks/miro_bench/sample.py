"""Section ``sample``: :class:`~miroflow.pipeline.MiroPipeline` sampling against the forward-only rate.

Random-weight pipeline (no downloads): the size's MIRO denoiser (weights perturbed by N(0, 0.02) so
DiT's zero init does not make every layer an identity), the trainable ``learned`` text encoder with
a random vocabulary, and pixels (``tiny``) or a random SDXL-shaped ``AutoencoderKL`` (``paper``,
4×32×32 latents → 256 px, so decoding costs what it would). ``paper`` runs the denoiser in bf16.

Variants (alternating blocks): ``pipe(1 prompt)`` and ``pipe(64 prompts)`` with ``steps`` Euler steps
and batched guidance (ω = 1: one forward of 2B rows per step), the MIRO denoiser's forward alone on
the same 2B rows ``steps`` times, and the bare diffusers backbone's forward on them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from miroflow.flow import cfg_model_fn
from miroflow.models import LearnedTokenEncoder, PixelCodec, VAECodec, count_params, create_denoiser
from miroflow.pipeline import MiroPipeline

from .common import Section, SizeSpec, alternate, check, spread, sync
from .data import sdxl_vae_dir

__all__ = ["build_pipeline", "run_sample"]

REWARDS = ["sharpness", "noise", "contrast", "compressibility", "shapes_alignment"]
WORDS = [f"w{i}" for i in range(500)]
OMEGA = 1.0


def build_pipeline(spec: SizeSpec, device: torch.device, root: Path) -> MiroPipeline:
    """A random-weight MIRO pipeline of ``spec`` on ``device`` (bf16 denoiser on CUDA at paper size)."""
    text_dim = 2048 if spec.name == "paper" else 384
    torch.manual_seed(0)
    enc = LearnedTokenEncoder(
        list(LearnedTokenEncoder.SPECIALS) + WORDS, dim=text_dim, num_layers=1, num_heads=4, max_length=32
    )
    den = create_denoiser(spec.name, REWARDS, text_dim=text_dim, pooled_dim=text_dim)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    codec = VAECodec(sdxl_vae_dir(root), device=device) if den.config.in_channels == 4 else PixelCodec()
    pipe = MiroPipeline(denoiser=den, text_encoder=enc, vae=codec)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if spec.name == "paper" and device.type == "cuda":
        pipe.to(dtype=torch.bfloat16)
    return pipe


def _prompts(n: int, salt: int = 0) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k + salt) % len(WORDS)] for k in range(12)) for i in range(n)]


def _conditions(pipe: MiroPipeline, prompts: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The pipeline's positive (targets 1) and negative (targets 0) conditions for ``prompts``."""
    emb = pipe.encode_prompt(prompts)
    n = len(prompts)
    base = {"text_tokens": emb.tokens, "text_mask": emb.mask, "pooled": emb.pooled}
    pos = dict(base, rewards=pipe._reward_tensor(pipe.resolve_reward_targets(None, 1.0), n))
    neg = dict(base, rewards=pipe._reward_tensor(pipe.resolve_reward_targets(None, 0.0), n))
    return pos, neg


def check_guidance(pipe: MiroPipeline, n: int = 4) -> float:
    """Batched guidance against a direct computation; returns the max abs error of the sampler check.

    1. ``cfg_model_fn`` (one forward of 2n rows) equals ``v⁺ + ω·(v⁺ − v⁻)`` from two separate forwards;
    2. one Euler step of the real ``pipe(...)`` from given noise equals ``decode(x₁ − v̂(x₁, 1))``.
    Tolerances: fp32 1e-4 relative to max |v| (batch-size-dependent matmul blocking only);
    bf16 3e-2 (one bf16 rounding of the velocity, ≈ 2⁻⁸ relative, with margin).
    """
    dev = pipe.device
    prompts = _prompts(n, salt=3)
    pos, neg = _conditions(pipe, prompts)
    x = pipe.prepare_latents(n, torch.Generator().manual_seed(0))
    t = torch.ones(n, device=dev)
    with torch.no_grad():
        guided = cfg_model_fn(pipe._velocity, pos, neg, OMEGA)(x, t)
        vp, vn = pipe._velocity(x, t, **pos), pipe._velocity(x, t, **neg)
    direct = vp + OMEGA * (vp - vn)
    scale = float(direct.abs().max().clamp_min(1e-6))
    tol = 1e-4 if pipe.dtype == torch.float32 else 3e-2
    err = float((guided - direct).abs().max()) / scale
    check(guided.shape == x.shape, f"guided velocity shape {tuple(guided.shape)} == {tuple(x.shape)}")
    check(err <= tol, f"batched guidance == v+ + w(v+ - v-) computed directly (rel err {err:.2e} <= {tol})")
    out = pipe(prompts, guidance_scale=OMEGA, num_inference_steps=1, latents=x, output_type="pt").images
    want = pipe.vae.decode(x - direct).float().clamp(0.0, 1.0).cpu()
    side = pipe.resolution
    check(tuple(out.shape) == (n, 3, side, side), f"sampler output {tuple(out.shape)} == {(n, 3, side, side)}")
    e2 = float((out - want).abs().max())
    check(e2 <= max(tol, 1e-4) * 10, f"one Euler step of the sampler == decode(x1 - v_hat) (max abs err {e2:.2e})")
    return max(err, e2)


class _Forwards:
    """``forwards`` forwards of a model on the 2B rows of batched guidance.

    Returns the images' worth of work: ``B · forwards / steps`` (a sampling run is ``steps`` forwards),
    so its rate compares with the sampler's img/s directly.
    """

    def __init__(self, fn: Callable[[], Any], forwards: int, steps: int, images: int) -> None:
        self.fn, self.forwards, self.steps, self.images = fn, forwards, steps, images

    def __call__(self) -> float:
        with torch.inference_mode():
            for _ in range(self.forwards):
                self.fn()
        return float(self.images * self.forwards / self.steps)


def _forward_fns(pipe: MiroPipeline, batch: int) -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """(MIRO denoiser forward, bare backbone forward) on 2·batch rows; the bare model's parameter count."""
    from diffusers import SD3Transformer2DModel

    dev = pipe.device
    pos, neg = _conditions(pipe, _prompts(batch))
    both = {k: torch.cat([pos[k], neg[k]]) for k in pos}
    x = torch.randn(2 * batch, *pipe.prepare_latents(1).shape[1:], generator=torch.Generator().manual_seed(0)).to(dev)
    t = torch.full((2 * batch,), 0.5, device=dev)
    bare = SD3Transformer2DModel.from_config(dict(pipe.denoiser.backbone.config)).to(dev, pipe.dtype).eval()
    low = pipe.dtype in (torch.float16, torch.bfloat16)

    def miro() -> Tensor:
        return pipe._velocity(x, t, **both)

    def plain() -> Tensor:
        with torch.autocast(device_type=dev.type, dtype=pipe.dtype, enabled=low):
            return bare(  # type: ignore[no-any-return]
                hidden_states=x,
                encoder_hidden_states=both["text_tokens"],
                pooled_projections=both["pooled"],
                timestep=t * 1000.0,
                return_dict=False,
            )[0]

    return miro, plain, count_params(bare)


def run_sample(spec: SizeSpec, device: torch.device, root: Path, steps: int | None = None) -> Section:
    """Check the guidance, then time sampling and the forward-only rates side by side."""
    t_start = time.perf_counter()
    steps = steps or spec.sample_steps
    sec = Section(f"sample ({spec.name}, {device.type}, {steps} Euler steps, batched guidance w={OMEGA:g})")
    pipe = build_pipeline(spec, device, root)
    err = check_guidance(pipe)
    b = spec.sample_batch
    one, many = _prompts(1, salt=11), _prompts(b)

    def call(prompts: list[str]) -> Callable[[], float]:
        def run() -> float:
            out = pipe(
                prompts, guidance_scale=OMEGA, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)
            )
            imgs = out.images
            check(imgs.shape[0] == len(prompts) and bool(torch.isfinite(torch.as_tensor(imgs)).all()), "finite images")
            return float(len(prompts))

        return run

    miro, plain, bare_params = _forward_fns(pipe, b)
    fwd = max(5, steps // 5)  # forward-only blocks: a fifth of a sampling run's forwards, rate per image-run
    variants: dict[str, Callable[[], float]] = {
        "batch1": call(one),
        f"batch{b}": call(many),
        "denoiser_forward": _Forwards(miro, fwd, steps, b),
        "bare_forward": _Forwards(plain, fwd, steps, b),
    }
    pipe(one, guidance_scale=OMEGA, num_inference_steps=2)  # warm-up (lazy init, allocator); blocks below are timed
    _Forwards(miro, 2, steps, b)()
    _Forwards(plain, 2, steps, b)()
    sync(device)
    t = alternate(variants, spec.sample_blocks, device, warmup=False)
    tb, tf, tp = t[f"batch{b}"], t["denoiser_forward"], t["bare_forward"]
    sec.add(f"sampling (batch {b}) / denoiser forward-only", tb.rate / tf.rate, detail=spread(tb, tf), goal=">= 0.8")
    sec.add(
        f"sampling (batch {b}) / bare backbone forward-only", tb.rate / tp.rate, detail=spread(tb, tp), goal=">= 0.8"
    )
    sec.add("denoiser forward / bare backbone forward", tf.rate / tp.rate, detail="mask + reward embedder")
    sec.add(f"sampling batch {b}", tb.rate, "img/s", f"{steps} steps, 2x{b} rows per step")
    lat = t["batch1"].seconds / max(1, len(t["batch1"].blocks))
    sec.add("sampling batch 1 latency", lat, "s", f"{steps} steps, 2 rows per step")
    sec.add("guidance check (max rel err)", err, "", "batched vs direct, and the sampler's Euler step")
    sec.numbers = {
        "img_s": {k: v.rate for k, v in t.items()},
        "batch1_latency_s": lat,
        "guidance_check_err": err,
        "denoiser_params": count_params(pipe.denoiser),
        "bare_params": bare_params,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "steps": steps,
        "batch": b,
        "resolution": pipe.resolution,
        "threads": torch.get_num_threads(),
    }
    sec.notes.append(
        f"denoiser {count_params(pipe.denoiser) / 1e6:.2f}M ({sec.numbers['dtype']}), "
        f"{'SDXL-shaped VAE decode' if isinstance(pipe.vae, VAECodec) else 'pixel space'}, "
        f"{pipe.resolution} px; forward-only = the same 2x{b} rows ({fwd} forwards per block, rated per "
        f"{steps}-step run), no text encoding, no decoding"
    )
    if not math.isfinite(tb.rate):
        sec.notes.append("sampling rate is not finite")
    sec.seconds = time.perf_counter() - t_start
    return sec
