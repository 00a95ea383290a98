#!/usr/bin/env python
"""Training throughput and MFU of the library's MIRO train step vs. the bare SD3 backbone.

Measures, in one process on one device:

* **matmul reference**: the rate of a square matmul (bf16 8192³ on CUDA, fp32 1024³ on CPU);
* **full MIRO step**: :func:`miroflow.train_step.train_step` on a
  :class:`~miroflow.train_state.TrainState` built by :func:`miroflow.train_state.create_train_state`
  from in-memory data: random latents ``[N, 4, 32, 32]``, 77 text tokens of width 2048 with random
  padding, 7 rewards on the k/63 grid. So exactly what ``miroflow train`` runs: per-reward /
  whole-vector reward dropout, logit-normal t, flow-matching loss with t-bins, backward, grad-norm
  clip, AdamW, LR schedule, EMA (diffusers ``EMAModel``), bf16 autocast on CUDA. Drawing the step's
  inputs (:func:`~miroflow.train_step.make_batch`: gather + host->device copy) is timed separately;
* **bare step**: a plain diffusers ``SD3Transformer2DModel`` with the same backbone config on the same
  inputs (pooled text only, no mask, no rewards, no clip, no EMA), MSE to the same target, the same
  AdamW settings.

FLOPs per image per training step are computed analytically (see ``analytic_flops_per_image``)
and, unless ``--no-flop-counter`` (or ``--compile``), counted with
``torch.utils.flop_counter.FlopCounterMode`` on one more step of each kind (attention forced to the
math backend so every matmul is seen). MFU uses the analytic count (it does not depend on which
kernels the counter knows). MFU = (FLOPs/img × img/s) ÷ measured matmul FLOP/s (same device, same run).

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
import functools
import gc
import json
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import Tensor

from miroflow.config import Params, apply_overrides
from miroflow.data.train_data import TextArrays, TrainData
from miroflow.flow import interpolate, velocity_target
from miroflow.models import MiroDenoiser, TextEmbedding, count_params, create_denoiser
from miroflow.train_state import DistContext, TrainInputs, TrainState, create_train_state
from miroflow.train_step import StepBatch, make_batch, train_step

REWARD_NAMES = ["clip_score", "aesthetic", "image_reward", "pick_score", "hpsv2", "vqa_score", "sci_score"]
TEXT_TOKENS = 77
TEXT_DIM = 2048
POOLED_DIM = 2048
LATENT_CHANNELS = 4
LATENT_SIZE = 32
RESOLUTION = 256  # pixels; latents are RESOLUTION / 8 = LATENT_SIZE


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


# --------------------------------------------------------------------------- in-memory training state


@dataclass
class StandardLatents:
    """Codec of already-normalised latents ``[N, 4, 32, 32]`` (mean 0, std 1 per channel; no decoder)."""

    channels: int = LATENT_CHANNELS
    downsample: int = RESOLUTION // LATENT_SIZE
    mean: Tensor = field(default_factory=lambda: torch.zeros(LATENT_CHANNELS))
    std: Tensor = field(default_factory=lambda: torch.ones(LATENT_CHANNELS))


class EmptyCaptionEncoder:
    """A frozen-encoder stand-in: only the empty caption (text dropout) is ever encoded during training."""

    name, dim, pooled_dim, max_length = "synthetic", TEXT_DIM, POOLED_DIM, TEXT_TOKENS

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """``prompts`` -> zero tokens ``[B, 77, 2048]`` with one real token, zero pooled ``[B, 2048]``."""
        n = len(prompts)
        mask = torch.zeros(n, TEXT_TOKENS, dtype=torch.bool)
        mask[:, 0] = True
        return TextEmbedding(torch.zeros(n, TEXT_TOKENS, TEXT_DIM), mask, torch.zeros(n, POOLED_DIM))


def synthetic_data(n: int, seed: int) -> TrainData:
    """``n`` samples: latents fp16 ``[n, 4, 32, 32]``, text of random length (zero past the mask), rewards k/63."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, TEXT_TOKENS + 1, (n,), generator=g)
    mask = torch.arange(TEXT_TOKENS)[None, :] < lengths[:, None]
    tokens = (torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g) * mask[..., None]).half()
    text = TextArrays(tokens, mask, torch.randn(n, POOLED_DIM, generator=g))
    rewards = torch.randint(0, 64, (n, len(REWARD_NAMES)), generator=g).float() / 63.0
    latents = torch.randn(n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=g).half()
    return TrainData(
        keys=[f"{i:06d}" for i in range(n)],
        images=None,
        latents=latents,
        captions=[""] * n,
        syn_captions=None,
        reward_names=list(REWARD_NAMES),
        rewards=rewards,
        syn_rewards=None,
        text=text,
    )


def bench_params(args: argparse.Namespace, root: str) -> Params:
    """Training params of the benchmark (paper-like optimiser settings; nothing is written under ``root``)."""
    return apply_overrides(
        Params(),
        [
            f"storage.root={root}",
            f"data.resolution={RESOLUTION}",
            f"train.model={args.size}",
            "train.latent=vae",
            f"train.batch_size={args.batch}",
            "train.lr=1e-4",
            "train.weight_decay=0",
            "train.warmup_steps=0",
            f"train.steps={args.warmup + args.steps + 10}",
            "train.grad_clip=2.0",
            "train.ema_decay=0.9999",
            "train.reward_dropout=0.1",
            "train.all_reward_dropout=0.05",
            "train.text_dropout=0.0",
            f"train.seed={args.seed}",
            f"train.compile={str(bool(args.compile)).lower()}",
            f"train.device={args.device}",
        ],
    )


def build_state(args: argparse.Namespace, device: torch.device, root: str) -> TrainState:
    """A :class:`TrainState` of the ``args.size`` MIRO denoiser (7 rewards, text width 2048, 4×32×32 latents)."""
    params = bench_params(args, root)
    torch.manual_seed(args.seed)
    model = create_denoiser(
        args.size,
        reward_names=REWARD_NAMES,
        text_dim=TEXT_DIM,
        pooled_dim=POOLED_DIM,
        in_channels=LATENT_CHANNELS,
        sample_size=LATENT_SIZE,
    )
    inputs = TrainInputs(
        synthetic_data(max(2 * args.batch, 16), args.seed),
        StandardLatents(),
        model,
        list(REWARD_NAMES),
        frozen=EmptyCaptionEncoder(),
    )
    return create_train_state(params, inputs, DistContext(device=device))


# --------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], float], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """``warmup`` then ``steps`` calls of ``step`` (returns the loss; timed one by one, synchronised)."""
    times: list[float] = []
    loss = float("nan")
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return {"step_s": sum(timed) / max(1, len(timed)), "final_loss": loss, "first_step_s": times[0] if times else None}


def bench_full(args: argparse.Namespace, state: TrainState) -> dict[str, Any]:
    """Throughput of the library's ``train_step`` (``make_batch`` timed apart)."""
    device, batch_s = state.device, []

    def step() -> float:
        t0 = time.perf_counter()
        batch = make_batch(state)
        sync(device)
        batch_s.append(time.perf_counter() - t0)
        return train_step(state, batch).loss

    reset_peak(device)
    out = time_steps(step, device, args.steps, args.warmup)
    model = state.net.denoiser
    assert isinstance(model, MiroDenoiser)
    return {
        **out,
        "img_s": args.batch / out["step_s"],
        "make_batch_s": sum(batch_s[args.warmup :]) / max(1, args.steps),
        "params": count_params(model),
        "reward_embedder_params": count_params(model.reward_embedder),
        "peak_mem_gib": peak_gib(device),
        "optimizer": type(state.opt).__name__,
        "ema": type(state.ema).__name__,
        "step_impl": "miroflow.train_step.train_step",
    }


def bare_loss(model: Callable[..., Any], b: StepBatch) -> Tensor:
    """Bare SD3 forward on the step's inputs: no rewards, no mask; plain MSE to the velocity."""
    assert b.text is not None
    x_t = interpolate(b.x0, b.noise, b.t)
    pred = model(
        hidden_states=x_t,
        encoder_hidden_states=b.text.tokens,
        pooled_projections=b.text.pooled,
        timestep=b.t * 1000.0,
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), velocity_target(b.x0, b.noise).float())


def bench_bare(
    args: argparse.Namespace,
    backbone_config: dict[str, Any],
    b: StepBatch,
    amp: torch.dtype | None,
    lr: float,
    weight_decay: float,
) -> tuple[dict[str, Any], float | None]:
    """Throughput of the bare backbone on one fixed batch; also its counted FLOPs per image."""
    device = b.x0.device
    model = SD3Transformer2DModel.from_config(backbone_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    fwd: Callable[..., Any] = torch.compile(model) if args.compile else model

    def loss_fn() -> Tensor:
        with autocast(device, amp):
            return bare_loss(fwd, b)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    reset_peak(device)
    out = time_steps(step, device, args.steps, args.warmup)
    out.update(
        img_s=args.batch / out["step_s"],
        params=count_params(model),
        peak_mem_gib=peak_gib(device),
        optimizer=type(opt).__name__,
    )
    flops = counted_flops(loss_fn, backward=True) if args.flop_counter and not args.compile else None
    return out, flops / args.batch if flops else None


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


def counted_flops(fn: Callable[[], Any], backward: bool = False) -> float | None:
    """FLOPs of ``fn()`` (and of ``fn().backward()`` when ``backward``) counted by ``FlopCounterMode``."""
    try:
        from torch.utils.flop_counter import FlopCounterMode  # optional: older torch has no counter
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    try:  # the math backend decomposes attention into matmuls the counter knows
        from torch.nn.attention import SDPBackend, sdpa_kernel  # optional: older torch

        backend: contextlib.AbstractContextManager[Any] = sdpa_kernel(SDPBackend.MATH)
    except ImportError:
        backend = contextlib.nullcontext()
    with backend, counter:
        out = fn()
        if backward:
            out.backward()
    return float(counter.get_total_flops())


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
    args.device = str(device)
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
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()

    ref = matmul_rate(device, matmul_n, torch.bfloat16 if cuda else torch.float32, seconds=2.0 if cuda else 1.0)
    with tempfile.TemporaryDirectory(prefix="miroflow-bench-") as root:
        state = build_state(args, device, root)
        template = state.net.denoiser
        assert isinstance(template, MiroDenoiser)
        cfg, backbone_config = template.config, dict(template.backbone.config)  # type: ignore[attr-defined]
        flops: dict[str, float | None] = {
            "analytic_full": analytic_flops_per_image(template, with_rewards=True),
            "analytic_bare": analytic_flops_per_image(template, with_rewards=False),
        }
        full = bench_full(args, state)
        if args.flop_counter and not args.compile:
            b = make_batch(state)
            f = counted_flops(functools.partial(train_step, state, b))
            flops["counter_full"] = f / args.batch if f else None
        bare_batch = make_batch(state)
        lr, wd = state.params.train.lr, state.params.train.weight_decay
        del state, template
    reset_peak(device)
    bare = None
    if not args.skip_bare:
        bare, flops["counter_bare"] = bench_bare(args, backbone_config, bare_batch, amp, lr, wd)
        reset_peak(device)

    ref_flops = ref["tflops"] * 1e12
    counter_full = flops.get("counter_full")
    f_full, f_bare = float(flops["analytic_full"] or 0.0), float(flops["analytic_bare"] or 0.0)

    def mfu(img_s: float, f: float) -> float:
        return img_s * f / ref_flops

    summary: dict[str, Any] = {
        "size": args.size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
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
        "mfu_full_counter": mfu(full["img_s"], counter_full) if counter_full else None,
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
