"""Stage train: MIRO flow matching on shards + scores + bins (docs/design.md §3 and §7).

:func:`run_train` = :func:`build_train_state` (data, codec, encoders, denoiser, optimiser, resume),
then :func:`~miroflow.train_step.make_batch` + :func:`~miroflow.train_step.train_step` per step with
periodic metrics, EMA sample grids (:func:`log_samples`) and checkpoints
(:func:`~miroflow.train_state.save_train_checkpoint`). Everything random in a step is a pure function
of ``(train.seed, step, global sample index)``, so a run is independent of the world size and resumes
exactly from a checkpoint's step. DDP (``torchrun``): gloo on CPU, nccl on GPU; only rank 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from miroflow.checkpoint import checkpoint_uri, prune_checkpoints, resume_latest, run_uri
from miroflow.conditioning import BinSet, load_bins
from miroflow.config import Params
from miroflow.data.hashing import data_hash
from miroflow.data.shards import read_manifest
from miroflow.data.sidecars import embeds_manifest_path, vae_embed_problem
from miroflow.data.stream import ShardLoader, StreamSource, scan_captions
from miroflow.data.stream_plan import StreamPlan
from miroflow.data.train_data import TrainData, load_train_data, step_seed
from miroflow.flow import euler_sample
from miroflow.hacking_monitor import TrainingMonitor
from miroflow.models import create_codec, create_denoiser, create_text_encoder
from miroflow.rewards import mean_normalized_scores
from miroflow.storage import Storage, from_config, join_uri
from miroflow.tracking import NullTracker, Tracker, log_config
from miroflow.tracking.images import captioned_grid
from miroflow.train_state import (
    TrainInputs,
    TrainState,
    check_train_config,
    create_train_state,
    ema_decay_at,
    save_train_checkpoint,
    setup_dist,
    teardown_dist,
)
from miroflow.train_step import make_batch, train_step

__all__ = ["TrainOutput", "resolve_reward_names", "build_train_state", "log_samples", "run_train"]


# --------------------------------------------------------------------------- seams: rewards, data hash, embeds
# The only places training touches miroflow.rewards, the data hash and the embed stage's manifest.


def _reward_means(names: list[str], images: Tensor, prompts: list[str], cache: object = None) -> dict[str, float]:
    """``reward/<name>`` = mean normalised score of the samples, for the weight-free rewards (built and
    cached by :mod:`miroflow.rewards`)."""
    return mean_normalized_scores(names, images, prompts)


def _data_hash(params: Params) -> str:
    """``miroflow.data.hashing.data_hash`` of ``params.data``."""
    return data_hash(params.data)


def _embeds_manifest(params: Params) -> Path:
    """The embed stage's local manifest (``embeds.json`` next to ``data.manifest``)."""
    return embeds_manifest_path(params)


# --------------------------------------------------------------------------- building the state


@dataclass(frozen=True)
class TrainOutput:
    """What :func:`run_train` returns: the last checkpoint URI (``<run>/final`` when ``train.steps`` was
    reached), the last global-batch loss, the step reached, this call's wall time, its per-step losses and
    the EMA decay of the last EMA update (None before the first) and the reward-hacking flags raised at
    this call's eval points (:class:`~miroflow.hacking.Flag` texts, docs/hacking.md)."""

    checkpoint: str
    loss: float
    steps: int
    wall_time_s: float
    losses: tuple[float, ...]
    ema_decay: float | None = None
    hacking_flags: tuple[str, ...] = ()


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


def _reward_grid(params: Params, binset: BinSet | None) -> int:
    """``G`` of the ``k/G`` grid the conditioning values lie on: ``num_bins - 1`` of the bins trained
    with (``score.num_bins - 1`` for a baseline, which has no bins)."""
    return (binset.num_bins if binset is not None else params.score.num_bins) - 1


#: ``step_seed`` stream of the learned text encoder's initialisation.
_TEXT_INIT_STREAM = 1_000


def data_mode(params: Params) -> str:
    """``"memory"`` or ``"stream"``: ``train.data``, with ``auto`` streaming above ``train.stream_above`` samples."""
    tp = params.train
    if tp.data != "auto":
        return tp.data
    return "stream" if int(read_manifest(params.data.manifest)["num_samples"]) > tp.stream_above else "memory"


def _stream_source(
    params: Params,
    storage: Storage,
    reward_names: list[str],
    binset: BinSet | None,
    frozen: Any,
    rank: int,
    world: int,
) -> StreamSource:
    """This rank's streaming source over the data manifest's shards (docs/architecture.md, "Streaming")."""
    tp = params.train
    shards = read_manifest(params.data.manifest)["shards"]
    plan = StreamPlan([int(s["n"]) for s in shards], tp.batch_size, tp.seed, tp.stream_partitions, tp.stream_window)
    loader = ShardLoader.from_manifests(
        storage,
        reward_names,
        binset,
        params.score.manifest if reward_names else None,
        _embeds_manifest(params),
        tp.text_encoder,
        frozen,
        tp.latent,
        params.data.resolution,
    )
    return StreamSource(plan, [str(s["uri"]) for s in shards], loader, rank, world, tp.stream_workers)


def _make_codec(params: Params, storage: Storage, device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """The latent codec and, for VAE latents, the embed stage's channel stats ``{"mean": [C], "std": [C], ...}``
    (recorded in ``miro.json`` as ``latent_stats``; docs/architecture.md, "Text-embedding sidecars").

    Raises:
        ValueError: no VAE latents of ``train.vae`` were embedded (one line naming the fix).
    """
    if params.train.latent == "pixel":
        return create_codec("pixel"), None
    problem = vae_embed_problem(params)
    if problem is not None:
        raise ValueError(problem)
    man = json.loads(_embeds_manifest(params).read_text())
    stats = json.loads(storage.read_bytes(man["latent_stats_uri"]))
    codec = create_codec("vae", params.train.vae, device=device)
    codec.mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device)  # type: ignore[union-attr]
    codec.std = torch.tensor(stats["std"], dtype=torch.float32, device=device)  # type: ignore[union-attr]
    return codec, stats


def _miro_spec(
    params: Params,
    model: Any,
    reward_names: list[str],
    binset: BinSet | None,
    encoder: Any,
    latent_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``miro.json`` document (without ``step``)."""
    tp = params.train
    bins = BinSet(binset.num_bins, {n: binset.rewards[n] for n in reward_names}).to_json() if binset else None
    return {
        "run_name": tp.run_name,
        "text_encoder": tp.text_encoder,
        "text_max_length": int(encoder.max_length),
        "latent": tp.latent,
        "vae": tp.vae if tp.latent == "vae" else None,
        "latent_stats": latent_stats,
        "resolution": params.data.resolution,
        "reward_names": list(reward_names),
        "bins": bins,
        "text_dropout": tp.text_dropout,
        "denoiser": model.config.model_dump(mode="json"),
        "seed": tp.seed,
        "data_hash": _data_hash(params),
    }


def build_train_state(
    params: Params, storage: Storage | None = None, tracker: Tracker | None = None, resume: bool = False
) -> TrainState:
    """Set up DDP, load the data (shards + scores + bins + embed sidecars), codec and text encoder, create
    (``torch.manual_seed(train.seed)``) or resume the denoiser, and build the
    :class:`~miroflow.train_state.TrainState`.

    Resume takes the newest complete checkpoint of the run that passes its hash record and loads
    (:func:`~miroflow.checkpoint.resume_latest`); newer damaged ones are skipped with a warning.

    Raises:
        ValueError: unknown ``train.rewards`` or a bad ``train.optimizer`` / ``train.batch_size``.
        ArchitectureMismatch: resuming a checkpoint of another architecture.
        CheckpointError: resuming a run whose complete checkpoints are all damaged (names the run).
    """
    tp = params.train
    storage = storage or from_config(params.storage)
    ctx = setup_dist(tp.device)
    reward_names, binset = resolve_reward_names(params)
    rs = resume_latest(run_uri(params), params, reward_names, storage) if resume else None
    check_train_config(tp, ctx.world)
    learned = tp.text_encoder == "learned"
    frozen = None if learned else create_text_encoder(tp.text_encoder, device=ctx.device)
    data: TrainData | StreamSource
    if data_mode(params) == "stream":
        data = _stream_source(params, storage, reward_names, binset, frozen, ctx.rank, ctx.world)
    else:
        data = load_train_data(
            params.data.manifest,
            storage,
            reward_names,
            binset,
            params.score.manifest,
            text_encoder=frozen,
            text_spec=tp.text_encoder,
            embeds_manifest=_embeds_manifest(params),
            latent=tp.latent,
        )
    res = params.data.resolution
    if isinstance(data, TrainData) and data.images is not None and tuple(data.images.shape[1:3]) != (res, res):
        h, w = data.images.shape[1:3]
        raise ValueError(
            f"data.resolution: {res}, but the images of {params.data.manifest} are {w}x{h}; "
            "set data.resolution to their size (pixel-space training does not resize)"
        )
    text: nn.Module | None = None
    if learned:
        caps = (
            data.captions + [c for c in data.syn_captions or [] if c]
            if isinstance(data, TrainData)
            else scan_captions(data.uris, storage)
        )
        if rs is not None:
            text = rs.text_encoder
        else:  # its init is seeded too (not by whatever ran before in this process); the denoiser's RNG is untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(tp.seed, 0, stream=_TEXT_INIT_STREAM))
                text = create_text_encoder("learned", captions=caps)  # type: ignore[assignment]
    encoder: Any = text if text is not None else frozen
    codec, latent_stats = _make_codec(params, storage, ctx.device)
    torch.manual_seed(tp.seed)
    if rs is not None:
        model = rs.denoiser
    else:
        chans = 3 if tp.latent == "pixel" else codec.channels
        model = create_denoiser(
            tp.model,
            reward_names,
            text_dim=encoder.dim,
            pooled_dim=encoder.pooled_dim,
            in_channels=chans,
            sample_size=params.data.resolution // codec.downsample,
            reward_features=tp.reward_features,
            reward_grid=_reward_grid(params, binset),
        )
    miro = _miro_spec(params, model, reward_names, binset, encoder, latent_stats)
    inputs = TrainInputs(data, codec, model, reward_names, miro, text=text, frozen=frozen, resume=rs)
    return create_train_state(params, inputs, ctx, storage, tracker)


# --------------------------------------------------------------------------- sample grids


@torch.no_grad()
def _sample_grid(
    params: Params,
    ema: nn.Module,
    encoder: Any,
    codec: Any,
    shape: tuple[int, int, int],
    reward_names: list[str],
    device: torch.device,
) -> tuple[np.ndarray, Tensor, list[str]]:
    """EMA samples of ``train.sample_prompts`` (fixed seed, rewards all 1.0):
    ``(grid uint8 [H, P·W, 3], images [P, 3, H, W] in [0, 1], prompts)``."""
    prompts = list(params.train.sample_prompts)
    emb = encoder.encode(prompts)
    tok, mask, pooled = emb.tokens.to(device).float(), emb.mask.to(device), emb.pooled.to(device).float()
    rewards = torch.ones(len(prompts), len(reward_names), device=device) if reward_names else None
    gen = torch.Generator().manual_seed(params.train.seed)
    was_training = ema.training
    ema.eval()
    x = euler_sample(
        lambda x_t, t: ema(x_t, t, tok, mask, pooled, rewards),
        (len(prompts), *shape),
        steps=params.train.sample_steps,
        generator=gen,
        device=device,
    )
    ema.train(was_training)
    images = codec.decode(x).float().cpu()
    grid = (images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3) * 255).round().to(torch.uint8).numpy()
    return grid, images, prompts


def log_samples(state: TrainState) -> tuple[Tensor, list[str]]:
    """Log the EMA sample grid (image series ``samples``: each sample upscaled to >= 128 px with its
    prompt under it, :func:`~miroflow.tracking.images.captioned_grid`) and the weight-free
    ``reward/<name>`` means at ``state.step``; returns the samples (``[P, 3, H, W]`` in [0, 1]) and
    their prompts (for the hacking monitor). Sampling draws from its own generator only."""
    state.ema.copy_to(state.ema_net.parameters())
    enc = state.ema_net.text if state.ema_net.text is not None else state.frozen
    _, images, prompts = _sample_grid(
        state.params, state.ema_net.denoiser, enc, state.codec, state.shape, state.reward_names, state.device
    )
    state.tracker.log_image(captioned_grid(images, prompts), key="samples", step=state.step)
    names = list(dict.fromkeys(state.reward_names + list(state.params.score.rewards)))
    state.tracker.log_metrics(_reward_means(names, images, prompts, state.scorers), state.step)
    return images, prompts


# --------------------------------------------------------------------------- the loop


def _open_sample_log(path: str | None, rank: int) -> IO[str] | None:
    """``train.sample_log`` opened for appending (``.rank<r>`` on ranks > 0), or None.

    One JSON line per step: ``{"step", "keys"}`` of this rank's rows. After a resume the steps run
    since the checkpoint appear again: the last line of a step is the one the weights saw.
    """
    if not path:
        return None
    p = Path(path if rank == 0 else f"{path}.rank{rank}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, "a", encoding="utf-8")  # noqa: SIM115 - closed at the end of run_train


def run_train(
    params: Params,
    storage: Storage | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> TrainOutput:
    """Train (or resume) ``train.run_name``.

    ``max_steps`` stops early at that step (a checkpoint is written there) without changing the
    schedule; ``losses`` are the global-batch mean losses of the steps run by this call.
    """
    t0 = time.time()
    state = build_train_state(params, storage, tracker or NullTracker(), resume)
    tp, main, tracker_ = params.train, state.dist.main, state.tracker
    if main:
        log_config(tracker_, params, "train")
        tracker_.set_tags(
            {
                "run_name": tp.run_name,
                "kind": "miro" if state.reward_names else "baseline",
                "world_size": str(state.dist.world),
            }
        )
    stop = min(tp.steps, max_steps if max_steps is not None else tp.steps)
    losses: list[float] = []
    bar = tqdm(total=stop, initial=state.step, desc=f"train {tp.run_name}", unit="step", disable=not main)
    keys_log = _open_sample_log(tp.sample_log, state.dist.rank)
    names = list(dict.fromkeys(state.reward_names + list(params.score.rewards)))
    monitor = TrainingMonitor(tracker_, names, judged=params.data.domain == "shapes")  # docs/hacking.md
    if main and state.step == 0:  # the image slider starts with the untrained model; the RNG state is restored
        with torch.random.fork_rng(devices=[state.device] if state.device.type == "cuda" else []):
            log_samples(state)
    while state.step < stop:
        ts0 = time.time()
        batch = make_batch(state)
        if keys_log is not None:
            keys_log.write(json.dumps({"step": batch.step, "keys": list(batch.keys)}) + "\n")
            keys_log.flush()
        metrics = train_step(state, batch)
        losses.append(metrics.loss)
        bar.update(1)
        step = state.step
        if main and (step % tp.log_every == 0 or step == stop):
            tracker_.log_metrics(metrics.log_metrics(img_per_s=tp.batch_size / max(1e-9, time.time() - ts0)), step)
            bar.set_postfix(loss=f"{metrics.loss:.4f}")
        if main and (step % tp.eval_every == 0 or step == tp.steps):
            monitor.observe(step, *log_samples(state))
        if main and (step % tp.checkpoint_every == 0 or step == stop):
            save_train_checkpoint(state, checkpoint_uri(state.run, step))
            prune_checkpoints(state.run, tp.keep_last, state.storage, newest=step)
    bar.close()
    if main:
        monitor.finish()
    state.source.close()
    if keys_log is not None:
        keys_log.close()
    final = checkpoint_uri(state.run, state.step)
    if state.step == tp.steps:
        final = join_uri(state.run, "final")
        if main:
            save_train_checkpoint(state, final)
    teardown_dist(state.dist)
    n_ema = state.ema.optimization_step
    return TrainOutput(
        checkpoint=final,
        loss=state.last_loss,
        steps=state.step,
        wall_time_s=time.time() - t0,
        losses=tuple(losses),
        ema_decay=ema_decay_at(n_ema, state.ema.decay, state.ema.warmup) if n_ema >= 1 else None,
        hacking_flags=tuple(f.text() for f in monitor.flags),
    )
