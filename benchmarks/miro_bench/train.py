"""Section ``train``: the library's train step, loader-fed and in-memory, beside the bare backbone and a matmul.

Variants (alternating blocks, one process):

* **memory** / **stream**: ``make_batch`` + :func:`miroflow.train_step.train_step` on
  :class:`~miroflow.train_state.TrainState` s built by :func:`miroflow.train.build_train_state` from the
  prepared dataset with ``train.data=memory`` and ``train.data=stream`` (the real
  :class:`~miroflow.data.stream.StreamSource`, one loader thread reading ahead): everything
  ``miroflow train`` runs per step (reward/text dropout, logit-normal t, flow-matching loss with
  t-bins, backward, clip, AdamW, LR schedule, EMA).
* **full**: the same step at the size's compute configuration. ``tiny``: the memory state itself.
  ``paper``: an in-memory state of the ≈ 371M MMDiT on latents ``[4, 32, 32]`` with 77 text tokens of
  width 2048 and 7 rewards (the configuration of the reference numbers in ``shared/STACK.md``).
* **bare**: a plain diffusers ``SD3Transformer2DModel`` with the full model's backbone config on the
  full model's batch: forward (no text mask, no rewards), MSE, backward, AdamW. No clip, EMA,
  schedule, data drawing or t-bins.
* **matmul**: square matmuls (fp32 1024³ on CPU, bf16 8192³ on CUDA): the rate MFU is measured against.

MFU = analytic training FLOPs per image × img/s ÷ the matmul rate of the same run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from miroflow.config import Params, apply_overrides
from miroflow.data.train_data import TextArrays, TrainData
from miroflow.flow import interpolate, velocity_target
from miroflow.models import MiroDenoiser, TextEmbedding, count_params, create_denoiser
from miroflow.train import build_train_state
from miroflow.train_state import DistContext, TrainInputs, TrainState, create_train_state
from miroflow.train_step import StepBatch, make_batch, train_step

from .common import Section, SizeSpec, Timing, alternate, check, matmul_block, peak_mem_gib, spread, sync
from .data import BenchData, train_overrides

__all__ = ["analytic_flops_per_image", "run_train"]

PAPER_REWARDS = ["clip_score", "aesthetic", "image_reward", "pick_score", "hpsv2", "vqa_score", "sci_score"]
PAPER_TEXT = (77, 2048)  # tokens, width (FLAN-T5-XL-like)


# --------------------------------------------------------------------------- FLOPs


def analytic_flops_per_image(model: MiroDenoiser, text_tokens: int, with_rewards: bool) -> float:
    """Training FLOPs per image (forward + backward; 2 FLOPs per multiply-add of matmuls and attention).

    Counts the patch embedding, the text/timestep/pooled embedders, every joint block (adaLN linears,
    q/k/v/out of both streams, attention scores and weighted sum over ``N + L`` tokens, 4× MLPs; the
    last block's text stream stops after k/v), the output layer and, ``with_rewards``, the reward
    MLPs (twice for ``grid_interp``: both grid neighbours). A layer costs 3× its forward in training
    (forward, input grad, weight grad) except input layers whose inputs need no gradient (2×).
    Elementwise ops (norms, activations, softmax) are ignored.
    """
    c = model.config
    w = c.width
    n = (c.sample_size // c.patch_size) ** 2
    lt = text_tokens
    pp_c = c.patch_size * c.patch_size * c.in_channels
    rewards = with_rewards and bool(c.reward_names)
    first = n * pp_c * w + lt * c.text_dim * w + 256 * w  # patchify, context embedder, timestep linear_1
    inner = 2 * w * w  # timestep linear_2, pooled linear_2
    if rewards:
        inner += c.pooled_dim * w  # pooled linear_1 sees pooled + reward embedding (needs grad)
    else:
        first += c.pooled_dim * w
    for i in range(c.num_layers):
        last = i == c.num_layers - 1
        inner += 6 * w * w + (2 if last else 6) * w * w  # adaLN
        inner += 3 * n * w * w + 3 * lt * w * w  # q, k, v of both streams
        inner += n * w * w + (0 if last else lt * w * w)  # output projections
        inner += 2 * (n + lt) ** 2 * w  # QK^T and AV
        inner += 8 * n * w * w + (0 if last else 8 * lt * w * w)  # 4x MLPs
    inner += 2 * w * w + n * w * pp_c  # norm_out adaLN, proj_out
    if rewards:
        h = c.reward_hidden_dim or w
        rows = 2 if c.reward_features == "grid_interp" else 1
        first += rows * len(c.reward_names) * (2 * c.num_frequencies + 1) * h
        inner += rows * len(c.reward_names) * h * c.pooled_dim
    return 2.0 * (2 * first + 3 * inner)


# --------------------------------------------------------------------------- the paper compute state


@dataclass
class _Latents:
    """Codec of already-normalised latents ``[N, 4, 32, 32]`` (no decoder needed to train)."""

    channels: int = 4
    downsample: int = 8
    mean: Tensor = field(default_factory=lambda: torch.zeros(4))
    std: Tensor = field(default_factory=lambda: torch.ones(4))


class _EmptyCaption:
    """Frozen-encoder stand-in: only the empty caption (text dropout) is encoded during training."""

    name, dim, pooled_dim, max_length = "synthetic", PAPER_TEXT[1], PAPER_TEXT[1], PAPER_TEXT[0]

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """``[B, 77, 2048]`` zeros with one real token, zero pooled ``[B, 2048]``."""
        n, (lt, d) = len(prompts), PAPER_TEXT
        mask = torch.zeros(n, lt, dtype=torch.bool)
        mask[:, 0] = True
        return TextEmbedding(torch.zeros(n, lt, d), mask, torch.zeros(n, d))


def _synthetic_data(n: int, seed: int) -> TrainData:
    """``n`` latents fp16 ``[n, 4, 32, 32]``, text of random length (zero past the mask), rewards on k/63."""
    g = torch.Generator().manual_seed(seed)
    lt, d = PAPER_TEXT
    mask = torch.arange(lt)[None, :] < torch.randint(5, lt + 1, (n,), generator=g)[:, None]
    tokens = (torch.randn(n, lt, d, generator=g) * mask[..., None]).half()
    return TrainData(
        keys=[f"{i:06d}" for i in range(n)],
        images=None,
        latents=torch.randn(n, 4, 32, 32, generator=g).half(),
        captions=[""] * n,
        syn_captions=None,
        reward_names=list(PAPER_REWARDS),
        rewards=torch.randint(0, 64, (n, len(PAPER_REWARDS)), generator=g).float() / 63.0,
        syn_rewards=None,
        text=TextArrays(tokens, mask, torch.randn(n, d, generator=g)),
    )


def _paper_state(base: Params, device: torch.device, batch: int, compile_: bool) -> TrainState:
    """In-memory state of the paper MMDiT (7 rewards, text 77×2048, latents 4×32×32), paper-like optimiser."""
    params = apply_overrides(
        base,
        [
            "data.resolution=256",
            "train.latent=vae",
            "train.model=paper",
            f"train.batch_size={batch}",
            "train.lr=1e-4",
            "train.warmup_steps=0",
            "train.ema_decay=0.9999",
            "train.steps=1000000",
            f"train.compile={str(compile_).lower()}",
            f"train.device={device}",
        ],
    )
    torch.manual_seed(0)
    model = create_denoiser(
        "paper", PAPER_REWARDS, text_dim=PAPER_TEXT[1], pooled_dim=PAPER_TEXT[1], in_channels=4, sample_size=32
    )
    data = _synthetic_data(max(2 * batch, 16), 0)
    inputs = TrainInputs(data, _Latents(), model, list(PAPER_REWARDS), frozen=_EmptyCaption())
    return create_train_state(params, inputs, DistContext(device=device))


# --------------------------------------------------------------------------- steps


@dataclass
class _FullStep:
    """``make_batch`` + ``train_step`` blocks of one state, timing the two apart (per step)."""

    state: TrainState
    steps: int
    batch_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        dev = self.state.device
        for _ in range(self.steps):
            t0 = time.perf_counter()
            b = make_batch(self.state)
            sync(dev)
            t1 = time.perf_counter()
            m = train_step(self.state, b)
            sync(dev)
            self.batch_s.append(t1 - t0)
            self.step_s.append(time.perf_counter() - t1)
            check(math.isfinite(m.loss), f"loss {m.loss} at step {m.step} ({self.state.params.train.data}) is finite")
        return float(self.steps * self.state.params.train.batch_size)

    def timed(self, which: str) -> float:
        """Mean seconds per step of ``make_batch`` (``"batch"``) or ``train_step`` (``"step"``), warm-up block excluded."""
        xs = (self.batch_s if which == "batch" else self.step_s)[self.steps :]
        return sum(xs) / max(1, len(xs))


class _BareStep:
    """A bare ``SD3Transformer2DModel`` training step on one fixed batch (the full model's inputs)."""

    def __init__(self, state: TrainState, steps: int, compile_: bool) -> None:
        from diffusers import SD3Transformer2DModel

        den = state.net.denoiser
        assert isinstance(den, MiroDenoiser)
        torch.manual_seed(0)
        self.model = SD3Transformer2DModel.from_config(dict(den.backbone.config)).to(state.device).train()
        tp = state.params.train
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
        self.fwd: Callable[..., Any] = torch.compile(self.model) if compile_ else self.model
        self.batch = make_batch(state)
        self.autocast = state.autocast
        self.steps = steps
        self.batch_size = tp.batch_size
        self.params = count_params(self.model)

    def loss(self) -> Tensor:
        """MSE of the bare forward to the velocity target (pooled text only, no mask, no rewards)."""
        b: StepBatch = self.batch
        assert b.text is not None
        with self.autocast:
            pred = self.fwd(
                hidden_states=interpolate(b.x0, b.noise, b.t),
                encoder_hidden_states=b.text.tokens,
                pooled_projections=b.text.pooled,
                timestep=b.t * 1000.0,
                return_dict=False,
            )[0]
        check(pred.shape == b.x0.shape, f"bare backbone output {tuple(pred.shape)} != x0 {tuple(b.x0.shape)}")
        return F.mse_loss(pred.float(), velocity_target(b.x0, b.noise).float())

    def __call__(self) -> float:
        for _ in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss()
            loss.backward()
            self.opt.step()
        check(math.isfinite(float(loss.detach())), "bare backbone loss is finite")
        return float(self.steps * self.batch_size)


# --------------------------------------------------------------------------- correctness


def _check_state(state: TrainState, label: str) -> None:
    """One step of a fresh state: shapes, and the first loss equals mean((ε − x0)²) computed directly.

    A fresh MIRO denoiser outputs exactly ``v = 0`` (DiT zero init of the output projection), so
    the first step's flow-matching loss must be the mean of ``(noise − x0)²`` over the batch.
    """
    tp = state.params.train
    b = make_batch(state)
    rows = tp.batch_size // state.dist.world
    check(tuple(b.x0.shape) == (rows, *state.shape), f"{label}: x0 {tuple(b.x0.shape)} != {(rows, *state.shape)}")
    check(tuple(b.t.shape) == (rows,) and bool(((b.t >= 0) & (b.t <= 1)).all()), f"{label}: t is [B] in [0, 1]")
    if state.reward_names:
        check(b.rewards is not None and tuple(b.rewards.shape) == (rows, len(state.reward_names)), f"{label}: rewards")
    with torch.no_grad(), state.autocast:
        text = (b.text.tokens, b.text.mask, b.text.pooled) if b.text is not None else (None, None, None)
        pred = state.net(interpolate(b.x0, b.noise, b.t), b.t, *text, b.rewards, list(b.captions))
    check(tuple(pred.shape) == tuple(b.x0.shape), f"{label}: prediction {tuple(pred.shape)} != x0")
    expected = float((b.noise - b.x0).float().pow(2).mean())
    m = train_step(state, b)
    check(math.isfinite(m.loss), f"{label}: first loss {m.loss} is finite")
    check(
        abs(m.loss - expected) <= 1e-5 * max(1.0, expected),
        f"{label}: first loss {m.loss} == mean((noise - x0)^2) = {expected} (fresh model predicts v = 0)",
    )
    check(m.step == 1 and state.step == 1, f"{label}: the step counter advanced to 1")


# --------------------------------------------------------------------------- section


def run_train(
    spec: SizeSpec, device: torch.device, data: BenchData, batch: int, compile_: bool, threads: int | None
) -> Section:
    """Build the states, check them, time the variants side by side and fill the section table."""
    t_start = time.perf_counter()
    sec = Section(f"train ({spec.name}, {device.type}{', compiled' if compile_ else ''})")
    states = {
        m: build_train_state(apply_overrides(data.params, train_overrides(spec, m, batch, compile_)))
        for m in ("memory", "stream")
    }
    full = states["memory"] if spec.name == "tiny" else _paper_state(data.params, device, batch, compile_)
    if threads:
        torch.set_num_threads(threads)  # build_train_state sets one thread per core
    try:
        for label, st in [*states.items(), *([] if full is states["memory"] else [("full", full)])]:
            _check_state(st, label)
        bare = _BareStep(full, spec.block_steps, compile_)
        steps = {k: _FullStep(v, spec.block_steps) for k, v in states.items()}
        variants: dict[str, Callable[[], float]] = dict(steps)
        full_step = steps["memory"]
        if full is not states["memory"]:
            full_step = _FullStep(full, spec.block_steps)
            variants["full"] = full_step
        variants["bare"] = bare
        cuda = device.type == "cuda"
        mm = matmul_block(device, spec.matmul_n, torch.bfloat16 if cuda else torch.float32, 20 if cuda else 8)
        variants["matmul"] = mm
        timings = alternate(variants, spec.blocks, device)
        _fill(sec, spec, timings, steps, full_step, bare, full, states, device)
    finally:
        for st in states.values():
            st.source.close()
    sec.seconds = time.perf_counter() - t_start
    return sec


def _fill(
    sec: Section,
    spec: SizeSpec,
    t: dict[str, Timing],
    steps: dict[str, _FullStep],
    full_step: _FullStep,
    bare: _BareStep,
    full: TrainState,
    states: dict[str, TrainState],
    device: torch.device,
) -> None:
    """The ratio rows and raw numbers of the train section."""
    full_name = "memory" if full_step is steps["memory"] else "full"
    den = full.net.denoiser
    assert isinstance(den, MiroDenoiser)
    lt = int(bare.batch.text.tokens.shape[1]) if bare.batch.text is not None else 0
    f_full, f_bare = analytic_flops_per_image(den, lt, True), analytic_flops_per_image(den, lt, False)
    matmul = t["matmul"].rate
    tf, tb = t[full_name], t["bare"]
    step_only = full.params.train.batch_size / max(1e-12, full_step.timed("step"))
    sec.add(
        "full MIRO step / bare backbone step", tf.rate / tb.rate, detail=spread(tf, tb), goal=">= 0.9 (GPU, compiled)"
    )
    sec.add("  train_step alone / bare backbone step", step_only / tb.rate, detail="make_batch excluded")
    sec.add(
        "MFU full MIRO step", tf.rate * f_full / matmul, "%", f"vs {matmul / 1e12:.3f} TFLOP/s matmul", ">= 50% (GPU)"
    )
    sec.add("MFU bare backbone step", tb.rate * f_bare / matmul, "%", f"{f_bare / 1e9:.3f} GFLOP/img")
    tm, ts = t["memory"], t["stream"]
    sec.add("loader-fed / in-memory step", ts.rate / tm.rate, detail=spread(ts, tm), goal=">= 0.95")
    sec.add("full MIRO step", tf.rate, "img/s", f"batch {full.params.train.batch_size}")
    sec.add("bare backbone step", tb.rate, "img/s")
    sec.add("matmul reference", matmul / 1e12, "TFLOP/s", f"{spec.matmul_n}^3")
    ms, ss = steps["memory"], steps["stream"]
    sec.numbers = {
        "img_s": {k: v.rate for k, v in t.items() if k != "matmul"},
        "matmul_tflops": matmul / 1e12,
        "flops_per_img": {"full": f_full, "bare": f_bare},
        "make_batch_s_per_step": {"memory": ms.timed("batch"), "stream": ss.timed("batch")},
        "train_step_s_per_step": {"memory": ms.timed("step"), "stream": ss.timed("step")},
        "params": {"full": count_params(den), "bare": bare.params},
        "text_tokens": lt,
        "batch": full.params.train.batch_size,
        "blocks": spec.blocks,
        "block_steps": spec.block_steps,
        "precision": "bf16 autocast" if isinstance(full.autocast, torch.autocast) else "fp32",
        "threads": torch.get_num_threads(),
        "peak_mem_gib": peak_mem_gib(device),
        "data_config": {m: _describe(s) for m, s in states.items()},
        "full_config": _describe(full),
    }
    sec.notes.append(
        f"full = {_describe(full)}; bare = diffusers SD3Transformer2DModel, same backbone config "
        f"({bare.params / 1e6:.2f}M params), same batch, no mask/rewards/clip/EMA/schedule"
    )
    sec.notes.append(
        f"make_batch per step: memory {1e3 * sec.numbers['make_batch_s_per_step']['memory']:.2f} ms, "
        f"stream {1e3 * sec.numbers['make_batch_s_per_step']['stream']:.2f} ms"
    )


def _describe(state: TrainState) -> str:
    """``<model> <params>M, <R> rewards, <C>×<h>×<w>, text <L>×<D>, <precision>``."""
    den = state.net.denoiser
    assert isinstance(den, MiroDenoiser)
    c = den.config
    prec = "bf16" if isinstance(state.autocast, torch.autocast) else "fp32"
    source = "synthetic in-memory" if isinstance(state.codec, _Latents) else f"train.data={state.params.train.data}"
    return (
        f"{c.size} MMDiT {count_params(den) / 1e6:.2f}M, {len(c.reward_names)} rewards, "
        f"{c.in_channels}x{c.sample_size}x{c.sample_size}, text {c.text_dim}-d, {prec}, {source}"
    )
