"""The benchmark's dataset, made by the library's own stages: prepare → score → bin → embed.

``tiny``: the demo's domain and model (shapes, 32 px, the five shapes rewards, MiniLM text sidecars,
pixel space). ``paper``: shapes at 256 px, three weight-free rewards, MiniLM sidecars and VAE
latents from a random-weight AutoencoderKL with the SDXL VAE's architecture (4×32×32 latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from miroflow.config import Params, apply_overrides
from miroflow.embed import run_embed
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score

from .common import SizeSpec

__all__ = ["BenchData", "prepare_data", "sdxl_vae_dir", "train_overrides"]

PAPER_REWARDS = ["sharpness", "noise", "contrast"]


@dataclass(frozen=True)
class BenchData:
    """A prepared dataset: its params (every manifest and the storage root under ``root``) and shard URIs."""

    root: Path
    params: Params
    shards: list[str]


def sdxl_vae_dir(root: Path) -> str:
    """Save a random-weight ``AutoencoderKL`` with the SDXL VAE's architecture under ``root/vae``; returns the dir."""
    from diffusers import AutoencoderKL

    out = root / "vae"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
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
        vae.save_pretrained(str(out))
    return str(out)


def _data_overrides(spec: SizeSpec, root: Path, device: torch.device, samples: int) -> list[str]:
    ov = [
        f"storage.root={root}/store",
        f"data.num_samples={samples}",
        f"data.shard_size={spec.shard_size}",
        f"data.resolution={spec.resolution}",
        f"data.manifest={root}/m/shards.json",
        f"score.manifest={root}/m/scores.json",
        f"score.bins={root}/m/bins.json",
        f"score.device={device.type}",
        f"score.batch_size={spec.score_batch}",
        "train.text_encoder=minilm",
        f"train.device={device}",
        "tracking.enabled=false",
    ]
    if spec.name == "paper":
        ov += [f"score.rewards={PAPER_REWARDS}", "train.latent=vae", f"train.vae={sdxl_vae_dir(root)}"]
    return ov


def train_overrides(spec: SizeSpec, mode: str, batch: int, compile_: bool) -> list[str]:
    """Training settings of a benchmark state: ``train.data=mode`` (memory | stream), the size's model."""
    partitions = max(1, min(8, batch, (spec.samples // spec.shard_size)))
    while batch % partitions:
        partitions -= 1
    return [
        f"train.model={spec.name}",
        f"train.data={mode}",
        f"train.run_name=bench-{mode}",
        f"train.batch_size={batch}",
        f"train.stream_partitions={partitions}",
        "train.stream_window=1",
        "train.stream_workers=1",
        "train.steps=1000000",
        "train.log_every=1000000",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        f"train.compile={str(compile_).lower()}",
    ]


def prepare_data(spec: SizeSpec, root: Path, device: torch.device, samples: int | None = None) -> BenchData:
    """Run prepare, score, bin and embed for ``spec`` under ``root`` (``samples`` overrides the size's count)."""
    n = samples or spec.samples
    params = apply_overrides(Params(), _data_overrides(spec, root, device, n))
    shards = [str(s["uri"]) for s in run_prepare(params)["shards"]]
    run_score(params)
    run_bin(params)
    run_embed(params)
    return BenchData(root, params, shards)
