#!/usr/bin/env python
"""Training throughput and MFU of the full MIRO step vs. the bare SD3 backbone.

Measures, in one process on one device:

* **matmul reference**: the rate of a square matmul (bf16 8192³ on CUDA, fp32 1024³ on CPU);
* **full MIRO step** (``MiroDenoiser``: reward embedder, masked joint attention): random latents
  ``[B, 4, 32, 32]``, 77 text tokens of width 2048 with random padding, a 7-reward vector with
  per-reward / whole-vector dropout, logit-normal t, flow-matching loss (``miroflow.flow``),
  backward, grad-norm clip 2.0, fused AdamW, EMA update of all weights (diffusers ``EMAModel``,
  foreach; a built-in foreach EMA if diffusers' is unavailable), bf16 autocast on CUDA;
* **bare step**: a plain diffusers ``SD3Transformer2DModel`` with the same config on the same
  batch (pooled text only, no mask, no rewards, no clip, no EMA), MSE to the same target.

FLOPs per image per training step are computed analytically (see ``analytic_flops_per_image``)
and, unless ``--no-flop-counter``, counted with ``torch.utils.flop_counter.FlopCounterMode`` on one
forward+backward at batch 1 (attention forced to the math backend so every matmul is seen).
MFU uses the analytic count (it does not depend on which kernels the counter knows).
MFU = (FLOPs/img × img/s) ÷ measured matmul FLOP/s (same device, same run).

On CPU the default is one intra-op thread (``--threads``): on a shared, loaded CPU OpenMP's
threads spin against each other and a 2-thread step can be 5-10× slower than a 1-thread one.

Prints one JSON object. Examples::

    python benchmarks/gpu_train.py --size paper --batch 128 --steps 30 --warmup 10          # CUDA
    python benchmarks/gpu_train.py --size tiny --device cpu                                   # < 60 s

Self-contained: needs only torch, diffusers and miroflow (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miroflow.flow import apply_reward_dropout, flow_matching_loss, interpolate, sample_t, velocity_target
from miroflow.models import MiroDenoiser, count_params, create_denoiser

REWARD_NAMES = ["clip_score", "aesthetic", "image_reward", "pick_score", "hpsv2", "vqa_score", "sci_score"]
TEXT_TOKENS = 77
TEXT_DIM = 2048
POOLED_DIM = 2048
LATENT_CHANNELS = 4
LATENT_SIZE = 32


# --------------------------------------------------------------------------- device helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Reset the peak-memory counter (CUDA) after freeing what is unused."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak allocated GiB on CUDA; process max RSS on CPU (covers the whole run so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when ``dtype`` is set, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, seconds: float = 2.0) -> dict[str, Any]:
    """FLOP/s of an ``n×n @ n×n`` matmul (2n³ FLOPs each), timed over about ``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    (a @ b)
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(3, min(200, int(seconds / one)))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    dt = time.perf_counter() - t0
    rate = 2.0 * n**3 * iters / dt
    del a, b
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "iters": iters, "tflops": rate / 1e12}


# --------------------------------------------------------------------------- batch and models


@dataclass
class Batch:
    """One synthetic training batch (already on the device)."""

    x0: Tensor  # [B, 4, 32, 32] latents
    tokens: Tensor  # [B, 77, 2048]
    mask: Tensor  # [B, 77] bool
    pooled: Tensor  # [B, 2048]
    rewards: Tensor  # [B, 7] bin values k/63


def make_batch(batch: int, device: torch.device, in_channels: int, sample_size: int, seed: int = 0) -> Batch:
    """Random latents, text tokens with random lengths, reward bin values on the k/63 grid."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, TEXT_TOKENS + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_TOKENS)[None, :] < lengths[:, None]
    return Batch(
        x0=torch.randn(batch, in_channels, sample_size, sample_size, generator=g).to(device),
        tokens=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g).to(device),
        mask=mask.to(device),
        pooled=torch.randn(batch, POOLED_DIM, generator=g).to(device),
        rewards=(torch.randint(0, 64, (batch, len(REWARD_NAMES)), generator=g).float() / 63.0).to(device),
    )


def build_full(size: str) -> MiroDenoiser:
    """The MIRO denoiser of ``size`` conditioned on 7 rewards, text width 2048, 4×32×32 latents."""
    return create_denoiser(
        size,
        reward_names=REWARD_NAMES,
        text_dim=TEXT_DIM,
        pooled_dim=POOLED_DIM,
        in_channels=LATENT_CHANNELS,
        sample_size=LATENT_SIZE,
    )


def build_bare(full: MiroDenoiser) -> nn.Module:
    """A fresh plain diffusers ``SD3Transformer2DModel`` with the full model's backbone config."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_config(dict(full.backbone.config))


class ForeachEMA:
    """Fallback EMA (``ema = decay·ema + (1-decay)·p`` with foreach lerp) if diffusers' is missing."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def step(self, params: Any = None) -> None:
        """One EMA update."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)


def make_ema(model: nn.Module, decay: float) -> tuple[Any, str]:
    """diffusers ``EMAModel`` (foreach) over ``model``'s parameters, or :class:`ForeachEMA`."""
    try:
        from diffusers.training_utils import EMAModel
    except Exception:  # noqa: BLE001 - optional training extras missing: use our own
        return ForeachEMA(list(model.parameters()), decay), "foreach_lerp"
    try:
        ema = EMAModel(model.parameters(), decay=decay, foreach=True)
        return ema, "diffusers.EMAModel(foreach)"
    except TypeError:
        return EMAModel(model.parameters(), decay=decay), "diffusers.EMAModel"


def make_optimizer(model: nn.Module, lr: float = 1e-4) -> tuple[torch.optim.Optimizer, str]:
    """AdamW fused (falls back to foreach where fused is unsupported)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True), "foreach"


# --------------------------------------------------------------------------- training steps


def full_forward_loss(model: Callable[..., Tensor], b: Batch) -> Tensor:
    """MIRO forward: reward dropout, logit-normal t, x_t, velocity, flow-matching loss."""
    n = b.x0.shape[0]
    rewards = apply_reward_dropout(b.rewards, p_each=0.1, p_all=0.05)
    t = sample_t(n, device=b.x0.device)
    noise = torch.randn_like(b.x0)
    x_t = interpolate(b.x0, noise, t)
    pred = model(x_t, t, b.tokens, b.mask, b.pooled, rewards)
    loss, _, _ = flow_matching_loss(pred, velocity_target(b.x0, noise), t)
    return loss


def bare_forward_loss(model: Callable[..., Any], b: Batch) -> Tensor:
    """Bare SD3 forward on the same batch: no rewards, no mask; plain MSE."""
    n = b.x0.shape[0]
    t = sample_t(n, device=b.x0.device)
    noise = torch.randn_like(b.x0)
    x_t = interpolate(b.x0, noise, t)
    pred = model(
        hidden_states=x_t,
        encoder_hidden_states=b.tokens,
        pooled_projections=b.pooled,
        timestep=t * 1000.0,
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), velocity_target(b.x0, noise).float())


def time_training(
    step: Callable[[], Tensor], device: torch.device, steps: int, warmup: int
) -> tuple[float, float, list[float]]:
    """Run ``warmup`` then ``steps`` steps; returns (mean seconds/step, last loss, warm-up seconds)."""
    warm_times: list[float] = []
    loss = torch.zeros(())
    for _ in range(warmup):
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        warm_times.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t0) / max(steps, 1)
    return dt, float(loss.detach().float().cpu()), warm_times


def bench_full(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None, b: Batch) -> dict[str, Any]:
    """Throughput of the full MIRO training step."""
    model = build_full(args.size).to(device).train()
    opt, opt_kind = make_optimizer(model)
    ema, ema_kind = make_ema(model, decay=0.9999)
    fwd: Callable[..., Tensor] = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> Tensor:
        with autocast(device, amp):
            loss = full_forward_loss(fwd, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        return loss

    reset_peak(device)
    dt, loss, warm = time_training(step, device, args.steps, args.warmup)
    out = {
        "params": count_params(model),
        "reward_embedder_params": count_params(model.reward_embedder),
        "step_s": dt,
        "img_s": args.batch / dt,
        "final_loss": loss,
        "first_step_s": warm[0] if warm else None,
        "peak_mem_gib": peak_gib(device),
        "optimizer": f"AdamW({opt_kind})",
        "ema": ema_kind,
    }
    del model, opt, ema, fwd, params
    reset_peak(device)
    return out


def bench_bare(
    args: argparse.Namespace, device: torch.device, amp: torch.dtype | None, b: Batch, template: MiroDenoiser
) -> dict[str, Any]:
    """Throughput of the bare SD3 backbone on the same batch."""
    model = build_bare(template).to(device).train()
    opt, opt_kind = make_optimizer(model)
    fwd: Callable[..., Any] = torch.compile(model) if args.compile else model

    def step() -> Tensor:
        with autocast(device, amp):
            loss = bare_forward_loss(fwd, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    reset_peak(device)
    dt, loss, warm = time_training(step, device, args.steps, args.warmup)
    out = {
        "params": count_params(model),
        "step_s": dt,
        "img_s": args.batch / dt,
        "final_loss": loss,
        "first_step_s": warm[0] if warm else None,
        "peak_mem_gib": peak_gib(device),
        "optimizer": f"AdamW({opt_kind})",
    }
    del model, opt, fwd
    reset_peak(device)
    return out


# --------------------------------------------------------------------------- FLOPs


def analytic_flops_per_image(model: MiroDenoiser, with_rewards: bool, text_tokens: int = TEXT_TOKENS) -> float:
    """Training FLOPs per image: forward + backward, FLOPs = 2 × multiply-adds of matmuls/attention.

    Counts the patch embedding, text/timestep/pooled embedders, every joint block (adaLN linears,
    q/k/v/out of both streams, attention scores and weighted sum over N+L tokens, 4× MLPs; the last
    block's text stream stops after k/v) and the output layer; plus the 7 reward MLPs when
    ``with_rewards``. A layer costs 3× its forward in training (forward, input grad, weight grad),
    except the input layers (patchify, text/timestep embedders, the reward MLPs' first layer; the
    pooled embedder in the bare model) whose inputs need no gradient: 2×. Elementwise ops (norms,
    activations, softmax) are ignored.
    """
    c = model.config
    w = c.width
    n = (c.sample_size // c.patch_size) ** 2
    lt = text_tokens
    pp_c = c.patch_size * c.patch_size * c.in_channels
    rewards = with_rewards and bool(c.reward_names)
    first = n * pp_c * w + lt * c.text_dim * w + 256 * w  # patchify, context embedder, timestep linear_1
    inner = w * w + w * w  # timestep linear_2, pooled linear_2 (per sample)
    if rewards:
        inner += c.pooled_dim * w  # pooled linear_1 sees pooled + reward embedding (needs grad)
    else:
        first += c.pooled_dim * w
    for i in range(c.num_layers):
        pre_only = i == c.num_layers - 1
        inner += 6 * w * w + (2 if pre_only else 6) * w * w  # adaLN (per sample)
        inner += 3 * n * w * w + 3 * lt * w * w  # q, k, v of both streams
        inner += n * w * w + (0 if pre_only else lt * w * w)  # output projections
        inner += 2 * (n + lt) ** 2 * w  # QK^T and AV
        inner += 8 * n * w * w + (0 if pre_only else 8 * lt * w * w)  # 4x MLPs
    inner += 2 * w * w + n * w * pp_c  # norm_out adaLN, proj_out
    if rewards:
        h = c.reward_hidden_dim or w
        first += len(c.reward_names) * (2 * c.num_frequencies + 1) * h
        inner += len(c.reward_names) * h * c.pooled_dim
    return 2.0 * (2 * first + 3 * inner)


def counted_flops_per_image(fn: Callable[[], Tensor]) -> float | None:
    """FLOPs of one forward+backward (batch 1) counted by ``FlopCounterMode`` (None if unavailable)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    try:  # the math backend decomposes attention into matmuls the counter knows
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend: contextlib.AbstractContextManager[Any] = sdpa_kernel(SDPBackend.MATH)
    except ImportError:
        backend = contextlib.nullcontext()
    with backend, counter:
        loss = fn()
        loss.backward()
    return float(counter.get_total_flops())


def measure_counted_flops(size: str, device: torch.device) -> dict[str, float | None]:
    """Counted training FLOPs per image for the full and the bare model (fp32, batch 1)."""
    b = make_batch(1, device, LATENT_CHANNELS, LATENT_SIZE, seed=1)
    full = build_full(size).to(device)
    f_full = counted_flops_per_image(lambda: full_forward_loss(full, b))
    bare = build_bare(full).to(device)
    f_bare = counted_flops_per_image(lambda: bare_forward_loss(bare, b))
    del full, bare
    reset_peak(device)
    return {"full": f_full, "bare": f_bare}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI flags (see module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        choices=["tiny", "small", "paper"],
        default=None,
        help="model size (default: paper on CUDA, tiny on CPU)",
    )
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 1 on CPU)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: unchanged on CUDA, 1 on CPU)"
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile both models")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="side of the reference matmul (default: 8192 on CUDA, 1024 on CPU)",
    )
    p.add_argument(
        "--flop-counter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count FLOPs with FlopCounterMode",
    )
    p.add_argument("--skip-bare", action="store_true", help="only benchmark the full MIRO step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch", "steps", "matmul_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print (and return) the JSON summary."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or ("paper" if cuda else "tiny")
    args.batch = args.batch or (128 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.threads is None and not cuda:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    matmul_n = args.matmul_size or (8192 if cuda else 1024)
    amp = torch.bfloat16 if cuda else None
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()

    ref = matmul_rate(device, matmul_n, torch.bfloat16 if cuda else torch.float32, seconds=2.0 if cuda else 1.0)
    template = build_full(args.size)
    flops = {
        "analytic_full": analytic_flops_per_image(template, with_rewards=True),
        "analytic_bare": analytic_flops_per_image(template, with_rewards=False),
    }
    if args.flop_counter:
        counted = measure_counted_flops(args.size, device)
        flops["counter_full"] = counted["full"]
        flops["counter_bare"] = counted["bare"]
    b = make_batch(args.batch, device, LATENT_CHANNELS, LATENT_SIZE, seed=args.seed)

    full = bench_full(args, device, amp, b)
    bare = None if args.skip_bare else bench_bare(args, device, amp, b, template)

    ref_flops = ref["tflops"] * 1e12
    f_full = flops["analytic_full"]
    f_bare = flops["analytic_bare"]

    def mfu(img_s: float, f: float) -> float:
        return img_s * f / ref_flops

    cfg = template.config
    summary: dict[str, Any] = {
        "size": args.size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "precision": "bf16 autocast" if amp is not None else "fp32",
        "compile": bool(args.compile),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "model": {
            "width": cfg.width,
            "layers": cfg.num_layers,
            "patch": cfg.patch_size,
            "image_tokens": (cfg.sample_size // cfg.patch_size) ** 2,
            "text_tokens": TEXT_TOKENS,
            "text_dim": TEXT_DIM,
            "rewards": len(REWARD_NAMES),
        },
        "matmul": ref,
        "flops_per_img_train": flops,
        "flops_source_for_mfu": "analytic",
        "threads": torch.get_num_threads(),
        "img_s_full": full["img_s"],
        "img_s_bare": bare["img_s"] if bare else None,
        "ratio_full_over_bare": full["img_s"] / bare["img_s"] if bare else None,
        "achieved_tflops_full": full["img_s"] * f_full / 1e12,
        "achieved_tflops_bare": bare["img_s"] * f_bare / 1e12 if bare else None,
        "mfu_full": mfu(full["img_s"], f_full),
        "mfu_bare": mfu(bare["img_s"], f_bare) if bare else None,
        "mfu_full_counter": mfu(full["img_s"], flops["counter_full"]) if flops.get("counter_full") else None,
        "peak_mem_gib_full": full["peak_mem_gib"],
        "peak_mem_gib_bare": bare["peak_mem_gib"] if bare else None,
        "peak_mem_note": "torch.cuda.max_memory_allocated per variant" if cuda else "process max RSS so far (CPU)",
        "full": full,
        "bare": bare,
        "wall_s": time.perf_counter() - t_start,
    }
    for part in (full, bare):
        if part is not None and not math.isfinite(part["final_loss"]):
            raise SystemExit(f"non-finite loss in benchmark: {json.dumps(summary)}")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
