"""Shared builders for tiny random-weight models used across test modules."""

from __future__ import annotations

import torch

from miroflow.models import create_denoiser
from miroflow.models.text import LearnedTokenEncoder
from miroflow.models.vae import PixelCodec
from miroflow.pipeline import MiroPipeline
from miroflow.prompts import load_prompt_set

DIM = 32


def tiny_random_pipeline(rewards: list[str], run_name: str, step: int, perturb: float = 0.2) -> MiroPipeline:
    """A tiny MIRO pipeline (pixel space, learned text encoder) with weights perturbed by ``perturb``.

    A fresh denoiser outputs v = 0 (zero-init); the perturbation makes its samples vary in
    compressibility and judge score, so selection and sweep tests can fail.
    """
    torch.manual_seed(0)
    den = create_denoiser("tiny", rewards, text_dim=DIM, pooled_dim=DIM, num_layers=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    caps = [it.prompt for it in load_prompt_set("shapes:1")]
    enc = LearnedTokenEncoder.from_captions(caps, dim=DIM, num_layers=1, num_heads=2, max_length=16)
    pipe = MiroPipeline(
        denoiser=den.eval(),
        text_encoder=enc.eval(),
        vae=PixelCodec(),
        spec={
            "text_encoder": "learned",
            "text_max_length": 16,
            "resolution": 32,
            "reward_names": rewards,
            "run_name": run_name,
            "step": step,
        },
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checkpoint_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """The EMA and raw denoiser tensors of a local checkpoint folder, keyed ``<part>/<name>``."""
    from pathlib import Path

    from safetensors.torch import load_file

    return {
        f"{part}/{k}": v
        for part in ("ema", "denoiser")
        for k, v in load_file(str(Path(ckpt) / part / "model.safetensors")).items()
    }


def assert_same_weights(a_ckpt: str, b_ckpt: str) -> None:
    """Both checkpoints hold bit-identical EMA and raw weights (names the first differing tensors)."""
    a, b = checkpoint_weights(a_ckpt), checkpoint_weights(b_ckpt)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
