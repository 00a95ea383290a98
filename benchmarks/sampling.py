"""Sampling benchmark: batched guidance (one forward of 2B rows) vs two forwards of B, and images/s.

Measured in one run, on random-weight models of a ``MODEL_SIZES`` preset:

1. ``ratio = time(two forwards of B) / time(one forward of 2B)`` for the denoiser alone (median
   over interleaved repeats, so machine load hits both sides alike). > 1 means batching the two
   guidance branches is faster, which is what :class:`~miroflow.pipeline.MiroPipeline` does.
2. End-to-end ``MiroPipeline`` images/s (text encoding, ``--steps`` Euler steps, decoding) without
   guidance (ω = 0, B rows per step) and with guidance (ω = 7, 2B rows per step).

Text encoder: the trainable ``learned`` encoder with a random vocabulary (no downloads; text
encoding happens once per call and is negligible next to the denoiser). Codec: pixels for
tiny/small; for ``paper`` a randomly initialised SDXL-shaped ``AutoencoderKL`` (4×32×32 latents
→ 256 px), so decoding cost is realistic.

    python benchmarks/sampling.py                               # tiny, CPU
    python benchmarks/sampling.py --size paper --device cuda    # GPU, 50 steps, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from miroflow.models import LearnedTokenEncoder, PixelCodec, VAECodec, count_params, create_denoiser
from miroflow.pipeline import MiroPipeline

REWARDS = ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]  # seven, as in the paper
WORDS = [f"w{i}" for i in range(500)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _sdxl_vae_dir(tmp: Path) -> str:
    """A random-weight AutoencoderKL with the SDXL VAE's architecture, saved locally."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.13025,
    )
    vae.save_pretrained(str(tmp / "vae"))
    return str(tmp / "vae")


def build(size: str, device: torch.device, text_dim: int, tmp: Path) -> MiroPipeline:
    """A random MIRO pipeline of ``size`` on ``device``."""
    torch.manual_seed(0)
    enc = LearnedTokenEncoder(
        list(LearnedTokenEncoder.SPECIALS) + WORDS, dim=text_dim, num_layers=1, num_heads=4, max_length=32
    )
    den = create_denoiser(size, REWARDS, text_dim=text_dim, pooled_dim=text_dim)
    with torch.no_grad():  # leave DiT's zero init so every layer does real work
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    codec = VAECodec(_sdxl_vae_dir(tmp), device=device) if den.config.in_channels == 4 else PixelCodec()
    pipe = MiroPipeline(denoiser=den, text_encoder=enc, vae=codec)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def forward_ratio(pipe: MiroPipeline, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one 2B forward vs two B forwards, and their ratio."""
    dev = pipe.device
    cfg = pipe.denoiser.config
    side = pipe.resolution // int(pipe.vae.downsample)
    prompts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(12)) for i in range(batch)]
    emb = pipe.encode_prompt(prompts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(dev)
    t = torch.full((batch,), 0.5, device=dev)
    pos = torch.ones(batch, len(REWARDS), device=dev)
    neg = torch.zeros(batch, len(REWARDS), device=dev)
    cat = lambda a, b: torch.cat([a, b], dim=0)  # noqa: E731

    @torch.no_grad()
    def batched() -> None:
        pipe._velocity(
            cat(x, x),
            cat(t, t),
            cat(emb.tokens, emb.tokens),
            cat(emb.mask, emb.mask),
            cat(emb.pooled, emb.pooled),
            cat(pos, neg),
        )

    @torch.no_grad()
    def two() -> None:
        pipe._velocity(x, t, emb.tokens, emb.mask, emb.pooled, pos)
        pipe._velocity(x, t, emb.tokens, emb.mask, emb.pooled, neg)

    for _ in range(2):  # warm-up
        batched()
        two()
    tb, tt = [], []
    for _ in range(repeats):
        tb.append(_time(batched, dev))
        tt.append(_time(two, dev))
    mb, mt = statistics.median(tb), statistics.median(tt)
    return {"batched_2B_s": mb, "two_B_s": mt, "ratio_two_over_batched": mt / mb}


def throughput(pipe: MiroPipeline, batch: int, steps: int, omega: float, repeats: int) -> dict[str, float]:
    """End-to-end images/s of ``pipe(batch prompts, steps, guidance_scale=omega)`` (median of repeats)."""
    prompts = [" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(10)) for i in range(batch)]

    def run() -> None:
        pipe(prompts, guidance_scale=omega, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    run()  # warm-up
    times = [_time(run, pipe.device) for _ in range(repeats)]
    med = statistics.median(times)
    return {"seconds": med, "images_per_s": batch / med}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="MODEL_SIZES preset: tiny, small, paper")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--batch", type=int, default=None, help="prompts per call (default 8 on CPU, 64 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default 50 on CUDA, 10 on CPU)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument(
        "--text-dim", type=int, default=None, help="text token width (default 384; 2048 = FLAN-T5-XL for paper)"
    )
    ap.add_argument("--dtype", choices=["float32", "bf16"], default=None, help="denoiser dtype (default bf16 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda given but CUDA is not available")
    batch = args.batch or (64 if cuda else 8)
    steps = args.steps or (50 if cuda else 10)
    text_dim = args.text_dim or (2048 if args.size == "paper" else 384)
    dtype = args.dtype or ("bf16" if cuda else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="miro-bench-") as tmp:
        pipe = build(args.size, device, text_dim, Path(tmp))
        if dtype == "bf16":
            pipe.to(dtype=torch.bfloat16)
        result: dict[str, Any] = {
            "size": args.size,
            "device": str(device) if not cuda else torch.cuda.get_device_name(device),
            "params_denoiser_M": round(count_params(pipe.denoiser) / 1e6, 3),
            "batch": batch,
            "steps": steps,
            "dtype": dtype,
            "resolution": pipe.resolution,
            "threads": torch.get_num_threads(),
        }
        result["forward"] = forward_ratio(pipe, batch, args.repeats)
        result["pipeline_omega0"] = throughput(pipe, batch, steps, 0.0, max(1, args.repeats // 2))
        result["pipeline_omega7"] = throughput(pipe, batch, steps, 7.0, max(1, args.repeats // 2))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
