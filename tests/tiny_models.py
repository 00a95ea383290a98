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
