"""Everything a training run holds between steps (:class:`TrainState`) and how it is built and saved.

:func:`create_train_state` builds the state from already-loaded :class:`TrainInputs` (data, codec,
denoiser, text encoders, an optional resume checkpoint); :func:`miroflow.train.build_train_state`
loads those from ``params`` + storage and calls it, and a benchmark or a test may call it with
in-memory inputs. The state is mutated only by :func:`miroflow.train_step.train_step`.

EMA: :class:`ScheduledEMA` is diffusers' ``EMAModel`` (same update arithmetic, same state dict) whose
decay comes from our :func:`ema_decay_at` (``train.ema_decay``, ``train.ema_warmup``), so the decay
that runs is the one configured, logged (``train/ema_decay``) and reported (docs/fidelity.md, "EMA").
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from miroflow.checkpoint import ResumeState, run_uri, save_checkpoint
from miroflow.config import Params, TrainConfig
from miroflow.data.train_data import BatchSource, MemorySource, TextArrays, TrainData, rank_slice
from miroflow.models import MiroDenoiser, TextEncoder
from miroflow.storage import Storage, from_config
from miroflow.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

__all__ = [
    "ScheduledEMA",
    "ema_decay_at",
    "DistContext",
    "TrainNet",
    "TrainInputs",
    "TrainState",
    "setup_dist",
    "teardown_dist",
    "check_train_config",
    "lr_lambda",
    "precision_context",
    "create_train_state",
    "train_state_dict",
    "save_train_checkpoint",
]


def ema_decay_at(update: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay of the ``update``-th EMA update (1-based: the first optimiser step is update 1).

    ``warmup`` (``train.ema_warmup``): ``min(decay, (1 + t) / (10 + t))`` with ``t = update - 1``, and
    ``0.0`` at the first update (the average starts as a copy of the weights after it); this is the
    schedule diffusers' ``EMAModel.get_decay`` applies by default, float for float. Without
    ``warmup``: ``decay`` from the first update on (the reference's constant EMA).

    Raises:
        ValueError: ``update < 1`` or ``decay`` outside ``[0, 1]``.
    """
    if update < 1:
        raise ValueError(f"EMA update numbers start at 1, got {update}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if not warmup:
        return float(decay)
    t = update - 1
    if t <= 0:
        return 0.0
    return min((1 + t) / (10 + t), decay)


class ScheduledEMA(EMAModel):
    """diffusers' ``EMAModel`` with the decay of update ``n`` taken from :func:`ema_decay_at`.

    :attr:`last_decay` is the decay the last :meth:`step` applied. The state dict is
    ``EMAModel``'s plus ``ema_warmup``; a state without it (written before it existed) ran the warm-up.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, warmup: bool = True) -> None:
        super().__init__(parameters, decay=decay, foreach=False)
        self.warmup = bool(warmup)

    @property
    def last_decay(self) -> float:
        """The decay the last :meth:`step` applied (NaN before the first)."""
        value: float | None = self.cur_decay_value
        return float("nan") if value is None else float(value)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of EMA update ``optimization_step`` (1-based), see :func:`ema_decay_at`."""
        return ema_decay_at(optimization_step, self.decay, self.warmup)

    def state_dict(self) -> dict[str, Any]:
        """``EMAModel.state_dict()`` plus ``ema_warmup``."""
        return {**super().state_dict(), "ema_warmup": self.warmup}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore decay, update count and warm-up flag (``ema_warmup`` absent = True, the old schedule)."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ema_warmup"})
        self.warmup = bool(state_dict.get("ema_warmup", True))


@dataclass(frozen=True)
class DistContext:
    """Where this process trains: ``rank`` of ``world`` on ``device``; ``own_group``: we created the group."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    own_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the only process that logs and writes."""
        return self.rank == 0


def setup_dist(device: str) -> DistContext:
    """Read ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, pick the device (``train.device``), set CPU threads and
    initialise the process group (gloo on CPU, nccl on GPU) when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda"):
        use_cuda = torch.cuda.is_available() if device == "auto" else True
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world)))
    init = world > 1 and not dist.is_initialized()
    if init:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, dev, init)


def teardown_dist(ctx: DistContext) -> None:
    """Barrier across ranks, then destroy the process group if :func:`setup_dist` created it."""
    if ctx.world > 1:
        dist.barrier()
        if ctx.own_group:
            dist.destroy_process_group()


def check_train_config(tp: TrainConfig, world: int) -> None:
    """Raises ValueError naming the field: an optimizer other than AdamW, or ``train.batch_size`` not
    divisible by ``world × train.grad_accum``."""
    if tp.optimizer != "adamw":
        raise ValueError(f"train.optimizer: {tp.optimizer!r} is not offered by miroflow.train; use 'adamw'")
    if tp.batch_size % (world * tp.grad_accum):
        raise ValueError(
            f"train.batch_size {tp.batch_size} must be divisible by world size {world} "
            f"× train.grad_accum {tp.grad_accum}"
        )


def precision_context(device: torch.device, mixed_precision: str) -> AbstractContextManager[Any]:
    """The autocast of ``train.mixed_precision`` on ``device`` (around the forward; the loss is fp32).

    ``"bf16"``: bf16 autocast on any device (CUDA, or CPU where torch's CPU autocast runs the matmuls
    in bf16); ``"auto"``: bf16 on CUDA, fp32 elsewhere (so CPU runs stay bit-identical to ``"no"``);
    ``"no"``: fp32.

    Raises:
        ValueError: any other value (names ``train.mixed_precision``).
    """
    if mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"train.mixed_precision: {mixed_precision!r} is not one of 'auto', 'no', 'bf16'")
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    if not bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor of a scheduler step: linear warm-up to 1, then cosine from 1 down to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


class TrainNet(nn.Module):
    """Denoiser + optional trainable text encoder, one module so DDP sees all parameters."""

    def __init__(self, denoiser: MiroDenoiser, text: nn.Module | None) -> None:
        super().__init__()
        self.denoiser, self.text = denoiser, text

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        tokens: Tensor | None,
        mask: Tensor | None,
        pooled: Tensor | None,
        rewards: Tensor | None,
        captions: list[str] | None = None,
    ) -> Tensor:
        """``x_t [b, C, h, w]``, ``t [b]``, text ``[b, L, D]``/``[b, L]``/``[b, Dp]`` (or ``captions`` for a
        trainable encoder), ``rewards [b, R]`` (NaN = absent) -> ``v [b, C, h, w]``."""
        if self.text is not None:
            emb = self.text.encode(captions)  # type: ignore[operator]
            tokens, mask, pooled = emb.tokens, emb.mask, emb.pooled
        return self.denoiser(x_t, t, tokens, mask, pooled, rewards)  # type: ignore[no-any-return]


@dataclass
class TrainInputs:
    """What a run trains on and with, loaded before any training object is built (modules on CPU).

    Attributes:
        data: the in-memory training set (images ``uint8 [N, H, W, 3]`` or the VAE posterior ``[N, 2, C, h, w]``),
            or a streaming :class:`~miroflow.data.train_data.BatchSource` (``train.data: stream``).
        codec: latent codec (``channels``, ``downsample``, ``encode``/``decode``; ``mean``/``std [C]`` for
            raw latents).
        model: the denoiser to train (fresh, initialised after ``torch.manual_seed(train.seed)``, or resumed).
        reward_names: the rewards the model is conditioned on (``[]`` = baseline).
        miro: the ``miro.json`` document without ``step``.
        text: the trainable text encoder (``learned``), else None.
        frozen: the frozen text encoder (sample prompts and the empty caption), else None.
        resume: the checkpoint being continued, else None.
    """

    data: TrainData | BatchSource
    codec: Any
    model: MiroDenoiser
    reward_names: list[str]
    miro: dict[str, Any] = field(default_factory=dict)
    text: nn.Module | None = None
    frozen: TextEncoder | None = None
    resume: ResumeState | None = None


@dataclass
class TrainState:
    """A run between two steps: modules, optimiser, data order and the step counter.

    ``shape`` is one sample's model-space ``(C, h, w)``; ``rows`` this rank's rows of a global batch;
    ``micro`` the samples of one micro-batch on this rank; ``empty`` the empty caption's embedding
    (``tokens [L, D]`` fp16, ``mask [L]``, ``pooled [Dp]``) for text dropout with precomputed text;
    ``fwd`` the (DDP-wrapped) ``net`` whose denoiser is compiled in place when ``train.compile``;
    ``autocast`` the context of ``train.mixed_precision`` (:func:`precision_context`); ``ema_net``
    receives the EMA weights on save.
    """

    params: Params
    dist: DistContext
    storage: Storage
    tracker: Tracker
    run: str
    reward_names: list[str]
    miro: dict[str, Any]
    data: TrainData | BatchSource
    source: BatchSource
    rows: slice
    micro: int
    codec: Any
    shape: tuple[int, int, int]
    frozen: TextEncoder | None
    empty: TextArrays | None
    net: TrainNet
    ema_net: TrainNet
    ema: ScheduledEMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ddp: nn.Module
    fwd: Callable[..., Tensor]
    autocast: AbstractContextManager[Any]
    step: int = 0
    last_loss: float = float("nan")
    scorers: dict[str, Any] = field(default_factory=dict)  # reward name -> scorer, for sample grids

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.dist.device


def create_train_state(
    params: Params,
    inputs: TrainInputs,
    ctx: DistContext | None = None,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
) -> TrainState:
    """Build the nets, EMA, AdamW, LR schedule, DDP wrapper (and the compiled denoiser) and batch order around ``inputs``;
    a resumed run restores optimiser, scheduler, EMA, torch RNG and step from ``inputs.resume``.

    Raises:
        ValueError: see :func:`check_train_config`.
    """
    tp = params.train
    ctx = ctx or DistContext()
    check_train_config(tp, ctx.world)
    device, rs, model, text, codec = ctx.device, inputs.resume, inputs.model, inputs.text, inputs.codec
    net = TrainNet(model, text).to(device)
    ema_net = TrainNet(
        rs.ema_denoiser if rs else copy.deepcopy(model), rs.ema_text_encoder if rs else copy.deepcopy(text)
    ).to(device)
    ema_net.requires_grad_(False)
    ema = ScheduledEMA(list(net.parameters()), decay=tp.ema_decay, warmup=tp.ema_warmup)
    opt = torch.optim.AdamW(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tp.warmup_steps, tp.steps, tp.min_lr_ratio))
    step, last_loss = 0, float("nan")
    if rs is not None:
        ts = rs.train_state
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        ema.load_state_dict(ts["ema"])  # the run continues its own EMA schedule
        if (ema.decay, ema.warmup) != (tp.ema_decay, tp.ema_warmup):
            log.warning(
                "resume: the checkpoint's EMA (decay %s, warm-up %s) continues; train.ema_decay %s / "
                "train.ema_warmup %s are ignored",
                ema.decay,
                ema.warmup,
                tp.ema_decay,
                tp.ema_warmup,
            )
        ema.shadow_params = [p.detach().clone() for p in ema_net.parameters()]
        torch.set_rng_state(ts["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ts["rng"]:
            torch.cuda.set_rng_state(ts["rng"]["cuda"], device)
        step, last_loss = int(ts["step"]), float(ts.get("last_loss", float("nan")))
        _check_order(ts.get("data", {}), _order_of(inputs.data))
    if tp.compile:
        net.denoiser.compile()  # in place: same module, same state-dict keys; the text encoder stays eager
    ddp: nn.Module = net
    if ctx.world > 1:
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    fwd: Callable[..., Tensor] = ddp
    autocast = precision_context(device, tp.mixed_precision)
    empty = None
    if inputs.frozen is not None:
        e = inputs.frozen.encode([""])
        empty = TextArrays(e.tokens[0].cpu().half(), e.mask[0].cpu(), e.pooled[0].cpu().float())
    side = params.data.resolution // codec.downsample
    return TrainState(
        params=params,
        dist=ctx,
        storage=storage or from_config(params.storage),
        tracker=tracker or NullTracker(),
        run=run_uri(params),
        reward_names=list(inputs.reward_names),
        miro=inputs.miro,
        data=inputs.data,
        source=MemorySource(inputs.data, tp.batch_size, tp.seed) if isinstance(inputs.data, TrainData) else inputs.data,
        rows=rank_slice(tp.batch_size, ctx.rank, ctx.world),
        micro=(tp.batch_size // ctx.world) // tp.grad_accum,
        codec=codec,
        shape=(codec.channels, side, side),
        frozen=inputs.frozen,
        empty=empty,
        net=net,
        ema_net=ema_net,
        ema=ema,
        opt=opt,
        sched=sched,
        ddp=ddp,
        fwd=fwd,
        autocast=autocast,
        step=step,
        last_loss=last_loss,
    )


def train_state_dict(state: TrainState) -> dict[str, Any]:
    """The checkpoint's ``train_state.pt``: step, last loss, optimiser, scheduler, EMA (without the
    shadow weights, saved as ``ema/``), torch (+ CUDA) RNG and the data position."""
    device = state.device
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    rng = {"torch": torch.get_rng_state(), **cuda}
    return {
        "step": state.step,
        "last_loss": float(state.last_loss),
        "optimizer": state.opt.state_dict(),
        "scheduler": state.sched.state_dict(),
        "ema": {k: v for k, v in state.ema.state_dict().items() if k != "shadow_params"},
        "rng": rng,
        "data": {
            "step": state.step,
            "samples_seen": state.step * state.params.train.batch_size,
            "dataset_size": len(state.data),
            "order": _order_of(state.data),
        },
    }


def _order_of(data: Any) -> dict[str, Any]:
    """What the run's sample order depends on: ``{"mode": "memory"}`` or the stream's settings."""
    describe = getattr(data, "describe", None)
    return {"mode": "stream", **describe()} if callable(describe) else {"mode": "memory"}


def _check_order(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume with another sample order (the world size may change; the order may not)."""
    before = saved.get("order")
    if before is not None and before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ValueError(
            f"train.data / train.stream_*: the checkpoint was trained with sample order {before}, these params give "
            f"{now} ({', '.join(changed)} differ); resume with the same settings (only the world size may change)"
        )


def save_train_checkpoint(state: TrainState, uri: str) -> str:
    """Copy the EMA weights into ``ema_net``, write the checkpoint to ``uri`` and log it; returns ``uri``."""
    state.ema.copy_to(state.ema_net.parameters())
    ts = train_state_dict(state)
    save_checkpoint(
        uri,
        state.storage,
        state.net.denoiser,
        state.ema_net.denoiser,
        dict(state.miro, step=state.step),
        ts,
        state.net.text,
        state.ema_net.text,
    )
    state.tracker.log_checkpoint(uri, state.step)
    return uri
