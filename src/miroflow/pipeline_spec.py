"""The data of a :class:`~miroflow.pipeline.MiroPipeline`: its ``miro.json`` spec and checkpoint layout.

Checkpoint layout (written by :meth:`MiroPipeline.save_pretrained
<miroflow.pipeline.MiroPipeline.save_pretrained>`, read by :func:`miroflow.pipeline_load.load_pipeline`),
safetensors only::

    <dir>/miro.json       the spec + {"pipeline": {"_class_name", "_diffusers_version", "components"}}
    <dir>/denoiser/       MiroDenoiser.save_pretrained (config.json + model.safetensors)
    <dir>/text_encoder/   only for the trainable ``learned`` encoder
    <dir>/vae/            only for latent = "vae": AutoencoderKL (safetensors) + latent_stats.json

``miro.json`` is written last (a directory without it is incomplete). Frozen pretrained text
encoders are rebuilt from their spec (``minilm``, ``t5:<path>``, ``clip:<path>``) on load.
Also here: the output type of a pipeline call, the guidance / output-type literals and the
argument parser of :meth:`MiroPipeline.to <miroflow.pipeline.MiroPipeline.to>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.utils import BaseOutput
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GuidanceMode", "LATENT_STATS_JSON", "MIRO_JSON", "MiroPipelineOutput", "MiroSpec", "OutputType"]


MIRO_JSON = "miro.json"
LATENT_STATS_JSON = "latent_stats.json"
GuidanceMode = Literal["rewards", "text", "none"]
OutputType = Literal["np", "pt", "pil"]


class MiroSpec(BaseModel):
    """The ``miro.json`` document (docs/architecture.md, "Checkpoints").

    Unknown keys are kept (``extra="allow"``) so a checkpoint written by a newer trainer
    round-trips through a pipeline save.
    """

    model_config = ConfigDict(extra="allow")

    format: int = Field(1, description="Layout version.")
    step: int | None = Field(None, description="Training step of the weights.")
    run_name: str | None = Field(None, description="Training run name.")
    text_encoder: str = Field(..., description="Text-encoder spec: minilm, learned, t5:<path>, clip:<path>.")
    text_max_length: int | None = Field(None, ge=1, description="Caption length in tokens (None = encoder default).")
    latent: Literal["pixel", "vae"] = Field("pixel", description="Space the denoiser models.")
    vae: str | None = Field(None, description="Path or hub id of the AutoencoderKL (latent = vae).")
    latent_stats: dict[str, Any] | None = Field(
        None, description="Per-channel latent stats {'mean': [...], 'std': [...]}."
    )
    resolution: int = Field(..., ge=1, description="Image side in pixels.")
    reward_names: list[str] = Field(
        default_factory=list, description="Conditioning rewards in column order ([] = baseline)."
    )
    bins: dict[str, Any] | None = Field(None, description="BinSet JSON the conditioning values came from.")
    text_dropout: float = Field(0.0, ge=0, le=1, description="Caption dropout used in training (> 0 enables text CFG).")
    denoiser: dict[str, Any] | None = Field(None, description="DenoiserConfig JSON.")


@dataclass
class MiroPipelineOutput(BaseOutput):  # type: ignore[misc]
    """Output of :meth:`MiroPipeline.__call__ <miroflow.pipeline.MiroPipeline.__call__>`.

    ``images``: ``np.ndarray [N, H, W, 3]`` float32 in [0, 1] (``output_type="np"``),
    ``Tensor [N, 3, H, W]`` float32 in [0, 1] on CPU (``"pt"``) or a list of N PIL images
    (``"pil"``). Image ``i·num_images_per_prompt + j`` is the j-th image of prompt i.
    """

    images: Any


def _parse_to_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.device | None, torch.dtype | None]:
    device: Any = kwargs.pop("device", None)
    dtype: Any = kwargs.pop("dtype", None)
    kwargs.pop("silence_dtype_warnings", None)
    if kwargs:
        raise TypeError(f"MiroPipeline.to() got unexpected keyword argument(s) {sorted(kwargs)}")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)):
            device = a
        else:
            raise TypeError(f"MiroPipeline.to() cannot interpret argument {a!r}")
    return (torch.device(device) if device is not None else None), dtype
