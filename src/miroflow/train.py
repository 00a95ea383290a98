"""Stage train: MIRO flow matching on shards + scores + bins (DESIGN §3, §7.7).

Everything random in a step is a pure function of ``(train.seed, step, global sample index)``:
the batch indices (:class:`~miroflow.data.train_data.GlobalBatchOrder`), the synthetic-caption
choice, ``t``, the noise, reward dropout and text dropout are drawn for the *whole global batch*
from generators seeded with ``step_seed(seed, step, stream)`` on every rank, then sliced
``[r·B/W, (r+1)·B/W)``. So a run is independent of the world size and resumes exactly from a
checkpoint's step. DDP (``torchrun``): gloo on CPU, nccl on GPU; only rank 0 writes.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from miroflow.checkpoint import checkpoint_uri, latest_checkpoint, load_for_resume, prune_checkpoints, run_uri, save_checkpoint
from miroflow.config import Params
from miroflow.conditioning import BinSet, load_bins
from miroflow.data.train_data import GlobalBatchOrder, load_train_data, rank_slice, step_seed
from miroflow.flow import apply_reward_dropout, apply_text_dropout, euler_sample, flow_matching_loss, interpolate, sample_t, velocity_target
from miroflow.storage import Storage, from_config, join_uri

__all__ = ["Tracker", "NullTracker", "WEIGHT_FREE_REWARDS", "resolve_reward_names", "run_train"]

#: Rewards cheap enough to score training-time samples with (no weights).
WEIGHT_FREE_REWARDS = ("sharpness", "noise", "contrast", "compressibility", "shapes_alignment")
T_BINS = 10


class Tracker(Protocol):
    """What training logs to (``miroflow.tracking.MlflowTracker`` implements it)."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...  # uint8 [H, W, 3]
    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, uri: str, step: int) -> None: ...


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...
    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, uri: str, step: int) -> None: ...


def resolve_reward_names(params: Params) -> tuple[list[str], BinSet | None]:
    """``train.rewards``: ``[]`` = baseline (no bins needed), ``null`` = every reward of the bins.

    Raises:
        ValueError: a requested reward is not in ``score.bins`` (names it and the valid ones).
    """
    wanted = params.train.rewards
    if wanted == []:
        return [], None
    binset = load_bins(params.score.bins)
    if wanted is None:
        return binset.names, binset
    unknown = [n for n in wanted if n not in binset.rewards]
    if unknown:
        raise ValueError(f"train.rewards: {unknown} not in the bins {params.score.bins} (bins have: {binset.names})")
    return list(wanted), binset


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Any:
    """Linear warm-up to 1, then cosine from 1 down to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


class _Net(nn.Module):
    """Denoiser + optional trainable text encoder, one module so DDP sees all parameters."""

    def __init__(self, denoiser: nn.Module, text: nn.Module | None) -> None:
        super().__init__()
        self.denoiser, self.text = denoiser, text

    def forward(self, x_t: Tensor, t: Tensor, tokens: Tensor | None, mask: Tensor | None, pooled: Tensor | None,
                rewards: Tensor | None, captions: list[str] | None = None) -> Tensor:
        """``x_t [b, C, h, w]``, ``t [b]``, text ``[b, L, D]``/``[b, L]``/``[b, Dp]`` or captions -> ``v [b, C, h, w]``."""
        if self.text is not None:
            emb = self.text.encode(captions)  # type: ignore[operator]
            tokens, mask, pooled = emb.tokens, emb.mask, emb.pooled
        return self.denoiser(x_t, t, tokens, mask, pooled, rewards)  # type: ignore[no-any-return]


def _setup_dist(params: Params) -> tuple[int, int, torch.device, bool]:
    """``(rank, world, device, we_initialised_the_group)``; sets CPU threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = params.train.device
    if want in ("auto", "cuda"):
        use_cuda = torch.cuda.is_available() if want == "auto" else True
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    else:
        device = torch.device(want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world)))
    init = world > 1 and not dist.is_initialized()
    if init:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, init


def _text_inputs(batch_text: Any, drop: Tensor, empty: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Precomputed text of a batch with dropped captions replaced by the empty caption's embedding."""
    tok = torch.where(drop[:, None, None], empty["tokens"], batch_text.tokens).to(device, torch.float32)
    mask = torch.where(drop[:, None], empty["mask"], batch_text.mask).to(device)
    pooled = torch.where(drop[:, None], empty["pooled"], batch_text.pooled).to(device, torch.float32)
    return tok, mask, pooled


@torch.no_grad()
def _sample_grid(params: Params, ema: nn.Module, encoder: Any, codec: Any, shape: tuple[int, int, int],
                 reward_names: list[str], device: torch.device) -> tuple[np.ndarray, Tensor, list[str]]:
    """EMA samples for ``train.sample_prompts`` (fixed seed, rewards all 1.0): ``(grid uint8 [H, P·W, 3], images [P, 3, H, W], prompts)``."""
    prompts = list(params.train.sample_prompts)
    emb = encoder.encode(prompts)
    tok, mask, pooled = emb.tokens.to(device).float(), emb.mask.to(device), emb.pooled.to(device).float()
    rewards = torch.ones(len(prompts), len(reward_names), device=device) if reward_names else None
    gen = torch.Generator().manual_seed(params.train.seed)
    was_training = ema.training
    ema.eval()
    x = euler_sample(lambda x_t, t: ema(x_t, t, tok, mask, pooled, rewards), (len(prompts), *shape),
                     steps=params.train.sample_steps, generator=gen, device=device)
    ema.train(was_training)
    images = codec.decode(x).float().cpu()
    grid = (images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3) * 255).round().to(torch.uint8).numpy()
    return grid, images, prompts


def _reward_means(names: list[str], images: Tensor, prompts: list[str], cache: dict[str, Any]) -> dict[str, float]:
    """``reward/<name>`` = mean normalised score of the samples, for the weight-free rewards."""
    from miroflow.rewards import create_reward

    out = {}
    for n in names:
        if n not in WEIGHT_FREE_REWARDS:
            continue
        r = cache.setdefault(n, create_reward(n))
        out[f"reward/{n}"] = float(r.normalize(r.score(images, prompts)).float().nanmean())
    return out


def run_train(params: Params, storage: Storage | None = None, tracker: Tracker | None = None,
              resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) ``train.run_name``; returns ``{"checkpoint", "loss", "steps", "wall_time_s", "losses"}``.

    ``max_steps`` stops early at that step (a checkpoint is written there) without changing the
    schedule; ``losses`` are the global-batch mean losses of the steps run by this call.
    """
    from diffusers.training_utils import EMAModel

    from miroflow.models import create_denoiser, create_text_encoder

    t0 = time.time()
    tp = params.train
    storage = storage or from_config(params.storage)
    tracker = tracker or NullTracker()
    rank, world, device, own_group = _setup_dist(params)
    main = rank == 0
    reward_names, binset = resolve_reward_names(params)
    run = run_uri(params)
    resume_uri = latest_checkpoint(run, storage) if resume else None
    state = load_for_resume(resume_uri, params, reward_names, storage) if resume_uri else None
    if tp.optimizer != "adamw":
        raise ValueError(f"train.optimizer: {tp.optimizer!r} is not offered by miroflow.train; use 'adamw'")
    if tp.batch_size % (world * tp.grad_accum):
        raise ValueError(f"train.batch_size {tp.batch_size} must be divisible by world size {world} × train.grad_accum {tp.grad_accum}")

    learned = tp.text_encoder == "learned"
    frozen = None if learned else create_text_encoder(tp.text_encoder, device=device)
    from miroflow.embed import embeds_manifest_path

    data = load_train_data(params.data.manifest, storage, reward_names, binset, params.score.manifest,
                           text_encoder=frozen, text_spec=tp.text_encoder, embeds_manifest=embeds_manifest_path(params), latent=tp.latent)
    if learned:
        text = state.text_encoder if state else create_text_encoder("learned", captions=data.captions + [c for c in data.syn_captions or [] if c])
    else:
        text = None
    enc_dims = (text.dim, text.pooled_dim) if text is not None else (frozen.dim, frozen.pooled_dim)  # type: ignore[union-attr]
    codec, latent_stats = _make_codec(params, storage, device)
    torch.manual_seed(tp.seed)
    if state is not None:
        model = state.denoiser
    else:
        chans = 3 if tp.latent == "pixel" else codec.channels
        model = create_denoiser(tp.model, reward_names, text_dim=enc_dims[0], pooled_dim=enc_dims[1], in_channels=chans,
                                sample_size=params.data.resolution // codec.downsample)
    net = _Net(model, text).to(device)
    ema_net = _Net(state.ema_denoiser if state else copy.deepcopy(model), (state.ema_text_encoder if state else copy.deepcopy(text))).to(device)
    ema_net.requires_grad_(False)
    ema = EMAModel(list(net.parameters()), decay=tp.ema_decay, foreach=False)
    opt = torch.optim.AdamW(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tp.warmup_steps, tp.steps, tp.min_lr_ratio))
    step = 0
    if state is not None:
        ts = state.train_state
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        ema.load_state_dict(ts["ema"])
        ema.shadow_params = [p.detach().clone() for p in ema_net.parameters()]
        torch.set_rng_state(ts["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ts["rng"]:
            torch.cuda.set_rng_state(ts["rng"]["cuda"], device)
        step = int(ts["step"])
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    fwd = torch.compile(ddp) if tp.compile else ddp
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and tp.mixed_precision in ("auto", "bf16") else nullcontext()
    empty = None
    if frozen is not None:
        e = frozen.encode([""])
        empty = {"tokens": e.tokens[0].cpu().half(), "mask": e.mask[0].cpu(), "pooled": e.pooled[0].cpu().float()}
    shape = (codec.channels, params.data.resolution // codec.downsample, params.data.resolution // codec.downsample)
    order = GlobalBatchOrder(len(data), tp.batch_size, tp.seed)
    sl = rank_slice(tp.batch_size, rank, world)
    micro = (tp.batch_size // world) // tp.grad_accum
    miro = _miro_spec(params, model, reward_names, binset, enc_dims, frozen or text, latent_stats)
    if main:
        tracker.log_params(params.model_dump(mode="json"))
        tracker.set_tags({"run_name": tp.run_name, "kind": "miro" if reward_names else "baseline", "world_size": str(world)})

    def checkpoint(uri: str) -> None:
        ema.copy_to(ema_net.parameters())
        ts = {"step": step, "last_loss": float(loss_val), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
              "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
              "data": {"step": step, "samples_seen": step * tp.batch_size, "dataset_size": len(data)}}
        save_checkpoint(uri, storage, net.denoiser, ema_net.denoiser, dict(miro, step=step), ts, net.text, ema_net.text)  # type: ignore[arg-type]
        tracker.log_checkpoint(uri, step)

    def evaluate() -> None:
        ema.copy_to(ema_net.parameters())
        enc = ema_net.text if ema_net.text is not None else frozen
        grid, images, prompts = _sample_grid(params, ema_net.denoiser, enc, codec, shape, reward_names, device)
        tracker.log_image(grid, key="samples", step=step)
        tracker.log_metrics(_reward_means(list(dict.fromkeys(reward_names + list(params.score.rewards))), images, prompts, reward_cache), step)

    reward_cache: dict[str, Any] = {}
    stop = min(tp.steps, max_steps if max_steps is not None else tp.steps)
    losses: list[float] = []
    loss_val = float(state.train_state.get("last_loss", float("nan"))) if state is not None else float("nan")
    bar = tqdm(total=stop, initial=step, desc=f"train {tp.run_name}", unit="step", disable=not main)
    while step < stop:
        ts0 = time.time()
        gidx = order.indices(step)
        g = [torch.Generator().manual_seed(step_seed(tp.seed, step, k)) for k in range(5)]
        use_syn = torch.rand(tp.batch_size, generator=g[0]) < tp.synthetic_caption_prob
        t_all = sample_t(tp.batch_size, generator=g[1])
        noise_all = torch.randn((tp.batch_size, *shape), generator=g[2])
        rdrop = apply_reward_dropout(torch.zeros(tp.batch_size, len(reward_names)), tp.reward_dropout, tp.all_reward_dropout, generator=g[3]).isnan()
        tdrop = apply_text_dropout(tp.batch_size, tp.text_dropout, generator=g[4])
        batch = data.batch(gidx[sl], use_syn[sl])
        x0 = _to_model_space(batch.x, codec, device)
        rew = batch.rewards.masked_fill(rdrop[sl], float("nan")).to(device)
        caps = ["" if d else c for c, d in zip(batch.captions, tdrop[sl].tolist())]
        if batch.text is not None:
            assert empty is not None
            tok, mask, pooled = _text_inputs(batch.text, tdrop[sl], empty, device)
        t, noise = t_all[sl].to(device), noise_all[sl].to(device)
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(2 * T_BINS + 1, dtype=torch.float64, device=device)
        for m in range(tp.grad_accum):
            ms = slice(m * micro, (m + 1) * micro)
            x_t = interpolate(x0[ms], noise[ms], t[ms])
            sync = ddp.no_sync() if world > 1 and m < tp.grad_accum - 1 else nullcontext()  # type: ignore[operator]
            with sync:
                with autocast:
                    pred = fwd(x_t, t[ms], *((tok[ms], mask[ms], pooled[ms]) if batch.text is not None else (None, None, None)),
                               rew[ms] if reward_names else None, caps[ms])
                loss, per_bin, counts = flow_matching_loss(pred.float(), velocity_target(x0[ms], noise[ms]), t[ms], T_BINS)
                (loss * (micro * world / tp.batch_size)).backward()
            sums += torch.cat([(per_bin * counts).double(), counts.double(), (loss.detach() * micro).double().reshape(1)])
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tp.grad_clip)
        opt.step()
        sched.step()
        ema.step(net.parameters())
        if world > 1:
            dist.all_reduce(sums)
        step += 1
        loss_val = float(sums[-1] / tp.batch_size)
        losses.append(loss_val)
        bar.update(1)
        if main and (step % tp.log_every == 0 or step == stop):
            metrics = {"loss": loss_val, "lr": float(sched.get_last_lr()[0]), "grad_norm": float(grad_norm),
                       "img_per_s": tp.batch_size / max(1e-9, time.time() - ts0)}
            metrics.update({f"loss/t_bin_{k}": float(sums[k] / sums[T_BINS + k]) for k in range(T_BINS) if sums[T_BINS + k] > 0})
            tracker.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{loss_val:.4f}")
        if main and (step % tp.eval_every == 0 or step == tp.steps):
            evaluate()
        if main and (step % tp.checkpoint_every == 0 or step == stop):
            checkpoint(checkpoint_uri(run, step))
            prune_checkpoints(run, tp.keep_last, storage)
    bar.close()
    final = checkpoint_uri(run, step)
    if step == tp.steps:
        final = join_uri(run, "final")
        if main:
            checkpoint(final)
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return {"checkpoint": final, "loss": loss_val, "steps": step, "wall_time_s": time.time() - t0, "losses": losses}


def _to_model_space(x: Tensor, codec: Any, device: torch.device) -> Tensor:
    """uint8 images ``[b, H, W, 3]`` or raw fp16 latents ``[b, C, h, w]`` -> normalised model input."""
    if x.dtype == torch.uint8:
        return codec.encode(x.to(device).permute(0, 3, 1, 2).float() / 255.0)
    z = x.to(device, torch.float32)
    return (z - codec.mean.view(1, -1, 1, 1).to(device)) / codec.std.view(1, -1, 1, 1).to(device)


def _make_codec(params: Params, storage: Storage, device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """The latent codec and, for VAE latents, the channel stats written by the embed stage."""
    import json

    from miroflow.models import create_codec

    if params.train.latent == "pixel":
        return create_codec("pixel"), None
    from miroflow.embed import embeds_manifest_path

    man = json.loads(embeds_manifest_path(params).read_text())
    stats = json.loads(storage.read_bytes(man["latent_stats_uri"]))
    codec = create_codec("vae", params.train.vae, device=device)
    codec.mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device)  # type: ignore[union-attr]
    codec.std = torch.tensor(stats["std"], dtype=torch.float32, device=device)  # type: ignore[union-attr]
    return codec, stats


def _miro_spec(params: Params, model: Any, reward_names: list[str], binset: BinSet | None, dims: tuple[int, int],
               encoder: Any, latent_stats: dict[str, Any] | None) -> dict[str, Any]:
    """The ``miro.json`` document (without ``step``)."""
    from miroflow.prepare import data_hash

    bins = None
    if binset is not None:
        bins = BinSet(binset.num_bins, {n: binset.rewards[n] for n in reward_names}).to_json()
    return {"run_name": params.train.run_name, "text_encoder": params.train.text_encoder, "text_max_length": int(encoder.max_length),
            "latent": params.train.latent, "vae": params.train.vae if params.train.latent == "vae" else None,
            "latent_stats": latent_stats, "resolution": params.data.resolution, "reward_names": list(reward_names), "bins": bins,
            "text_dropout": params.train.text_dropout, "denoiser": model.config.model_dump(mode="json"),
            "seed": params.train.seed, "data_hash": data_hash(params.data)}
