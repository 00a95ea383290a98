"""``MiroPipeline``: a diffusers ``DiffusionPipeline`` for reward-conditioned flow matching.

Components (registered with ``register_modules``, so ``pipe.components`` / ``pipe.config`` list
them like any diffusers pipeline):

* ``denoiser`` — :class:`~miroflow.models.MiroDenoiser` (SD3 MMDiT + reward embedder);
* ``text_encoder`` — any :class:`~miroflow.models.TextEncoder` (frozen MiniLM/T5/CLIP or the
  trainable ``learned`` encoder);
* ``vae`` — the latent codec: :class:`~miroflow.models.PixelCodec` or
  :class:`~miroflow.models.VAECodec` (a frozen diffusers ``AutoencoderKL``);

plus a :class:`MiroSpec` (``pipe.spec``): the ``miro.json`` document of the checkpoint layout
(docs/architecture.md) — reward names, resolution, latent kind, text-encoder spec, text dropout...

Sampling (docs/design.md §1, §3): Euler steps of :func:`miroflow.flow.euler_sample` from ``t = 1`` to
``0`` with the guided velocity ``v̂ = v(x, c, s⁺) + ω·(v(x, c, s⁺) − v(x, c, s⁻))``; both branches
run in **one** batched forward of ``2B`` rows (:func:`miroflow.flow.cfg_model_fn`); ``ω = 0``
runs a single conditional forward of ``B`` rows. Reward targets are conditioning values in
``[0, 1]`` (bin positions ``k/63``); unspecified positives default to 1.0, unspecified negatives
to 0.0, and ``None`` means *absent* (NaN → the reward's learned null embedding).

Guidance mode (:attr:`MiroPipeline.guidance_mode`):

* ``"rewards"`` — a MIRO model (≥ 1 reward): the negative branch keeps the caption and uses
  ``s⁻`` (the paper's reward guidance; text is never dropped in the negative branch).
* ``"text"`` — a baseline (no rewards) trained with ``text_dropout > 0``: classic text CFG,
  the negative branch is the empty caption ``""`` (what the trainer substitutes on dropout).
* ``"none"`` — a baseline trained without text dropout: it has no unconditional branch, so
  only ``guidance_scale = 0`` is allowed (any ω > 0 is an error saying why).

Saving (``save_pretrained``) writes safetensors only, in the checkpoint layout of
:mod:`miroflow.pipeline_spec` (``miro.json`` last; frozen text encoders are rebuilt on load).
diffusers' generic component saving cannot handle our plain ``nn.Module`` s (it only knows
``ModelMixin``/``PreTrainedModel`` subclasses), hence the override; ``.to``/``device``/``dtype``
are overridden for the same reason (our components are not ``ModelMixin`` s and the codecs and
frozen encoders are not modules at all).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from miroflow.flow import cfg_model_fn, euler_sample, guided_velocity
from miroflow.models.denoiser import MiroDenoiser
from miroflow.models.text import LearnedTokenEncoder, TextEmbedding, TextEncoder
from miroflow.models.vae import PixelCodec, VAECodec
from miroflow.pipeline_load import load_pipeline
from miroflow.pipeline_spec import (
    LATENT_STATS_JSON,
    MIRO_JSON,
    GuidanceMode,
    MiroPipelineOutput,
    MiroSpec,
    OutputType,
    _parse_to_args,
)
from miroflow.storage import Storage, join_uri

__all__ = [
    "MIRO_JSON",
    "MiroSpec",
    "MiroPipeline",
    "MiroPipelineOutput",
    "GuidanceMode",
    "GuidanceSchedule",
    "GuidanceDecay",
    "check_guidance_schedule",
    "guidance_weight",
    "scheduled_cfg_model_fn",
    "load_pipeline",
]


# --------------------------------------------------------------------------- guidance schedules
#: How ω varies along the trajectory (see :func:`guidance_weight`).
GuidanceSchedule = Literal["constant", "interval", "damped"]
#: The shape ``f`` of the damped schedule (see :func:`guidance_weight`).
GuidanceDecay = Literal["linear", "cosine"]
GUIDANCE_SCHEDULES: tuple[str, ...] = ("constant", "interval", "damped")
GUIDANCE_DECAYS: tuple[str, ...] = ("linear", "cosine")


def check_guidance_schedule(
    schedule: str, interval: Sequence[float] | None, decay: str
) -> tuple[GuidanceSchedule, tuple[float, float], GuidanceDecay]:
    """Validate a guidance schedule; returns ``(schedule, (t_lo, t_hi), decay)``.

    ``interval`` ``None`` means the whole trajectory ``(0.0, 1.0)``.

    Raises:
        ValueError: an unknown ``guidance_schedule`` or ``guidance_decay``, or a ``guidance_interval``
            that is not two finite numbers with ``0 <= t_lo < t_hi <= 1`` (the message names the field).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")
    if decay not in GUIDANCE_DECAYS:
        raise ValueError(f"guidance_decay must be one of {', '.join(GUIDANCE_DECAYS)}, got {decay!r}")
    iv = (0.0, 1.0) if interval is None else tuple(interval)
    if len(iv) != 2 or not all(
        isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in iv
    ):
        raise ValueError(f"guidance_interval must be two numbers [t_lo, t_hi], got {interval!r}")
    lo, hi = float(iv[0]), float(iv[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        raise ValueError(f"guidance_interval [{lo}, {hi}] must satisfy 0 <= t_lo < t_hi <= 1 (flow time, 1 = noise)")
    return schedule, (lo, hi), decay  # type: ignore[return-value]


def guidance_weight(
    omega: float,
    t: float,
    schedule: GuidanceSchedule = "constant",
    interval: tuple[float, float] = (0.0, 1.0),
    decay: GuidanceDecay = "linear",
) -> float:
    """The guidance weight ``ω_t`` used at flow time ``t`` (this codebase: ``t = 1`` noise, ``t = 0`` data;
    sampling runs ``t`` from 1 down to 0, :mod:`miroflow.flow`).

    * ``"constant"``: ``ω_t = ω``.
    * ``"interval"``: ``ω_t = ω`` if ``t_lo <= t <= t_hi`` else 0 (guidance in a limited interval,
      after Kynkäänniemi et al. 2024); at ``ω_t = 0`` the sampler runs only the positive branch.
    * ``"damped"``: ``ω_t = ω · f(t)``, decaying from the full ω at the noise end (``t = 1``) to 0 at
      the data end (``t = 0``): ``"linear"`` ``f(t) = t``; ``"cosine"`` ``f(t) = (1 − cos(π t)) / 2``
      (flat at both ends, 0.5 at ``t = 0.5``).

    Args:
        omega: the nominal ω (≥ 0).
        t: flow time in [0, 1].

    Returns:
        ``ω_t`` (a float, ``0 <= ω_t <= ω``).
    """
    if schedule == "constant":
        return omega
    if schedule == "interval":
        lo, hi = interval
        return omega if lo <= t <= hi else 0.0
    if schedule == "damped":
        f = t if decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
        return omega * min(1.0, max(0.0, f))
    raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")


def scheduled_cfg_model_fn(
    model_fn: Callable[..., Tensor],
    cond_pos: Mapping[str, Tensor],
    cond_neg: Mapping[str, Tensor],
    weight: Callable[[float], float],
) -> Callable[[Tensor, Tensor], Tensor]:
    """Like :func:`miroflow.flow.cfg_model_fn`, with ``ω_t = weight(t)`` chosen at every step.

    Args:
        model_fn: ``model_fn(x [N, ...], t [N], **cond) -> v [N, ...]`` (rows independent).
        cond_pos: conditioning tensors ``[B, ...]`` of ``s⁺``; ``cond_neg`` the same keys/shapes for ``s⁻``.
        weight: flow time ``t`` (float) -> ``ω_t >= 0``.

    Returns:
        ``f(x_t [B, ...], t [B]) -> v̂ [B, ...]``: ``ω_t = 0`` runs one forward of ``B`` rows (``v⁺``);
        otherwise one batched forward of ``2B`` rows and ``v⁺ + ω_t (v⁺ − v⁻)``. Every row of ``t``
        must hold the same time (as :func:`miroflow.flow.euler_sample` passes it).
    """
    if set(cond_pos) != set(cond_neg):
        raise ValueError(f"cond_pos and cond_neg keys differ: {sorted(cond_pos)} vs {sorted(cond_neg)}")
    pos = dict(cond_pos)
    both = {k: torch.cat([cond_pos[k], cond_neg[k]], dim=0) for k in cond_pos}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if t.numel() > 1 and not bool(torch.all(t == t.reshape(-1)[0])):
            raise ValueError("scheduled guidance needs one flow time per step (all rows of t equal)")
        w = float(weight(float(t.reshape(-1)[0])))
        if w == 0.0:
            return model_fn(x, t, **pos)
        bsz = x.shape[0]
        out = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **both)
        return guided_velocity(out[:bsz], out[bsz:], w)

    return guided


class MiroPipeline(DiffusionPipeline):  # type: ignore[misc]
    """Text-to-image sampling from a MIRO (or baseline) flow-matching model.

    Args:
        denoiser: the velocity model (EMA weights for evaluation).
        text_encoder: caption encoder whose ``dim``/``pooled_dim`` match the denoiser's.
        vae: latent codec (``PixelCodec`` or ``VAECodec``).
        spec: the ``miro.json`` document; ``None`` derives a minimal one from the components.
    """

    model_cpu_offload_seq = "text_encoder->denoiser->vae"
    _optional_components: list[str] = []

    def __init__(
        self,
        denoiser: MiroDenoiser,
        text_encoder: TextEncoder,
        vae: PixelCodec | VAECodec,
        spec: MiroSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, text_encoder=text_encoder, vae=vae)
        if spec is None:
            spec = MiroSpec(
                text_encoder=str(getattr(text_encoder, "name", "minilm")),
                text_max_length=int(text_encoder.max_length),
                latent="vae" if isinstance(vae, VAECodec) else "pixel",
                vae=str(vae.path) if isinstance(vae, VAECodec) else None,
                resolution=denoiser.config.sample_size * int(vae.downsample),
                reward_names=denoiser.reward_names,
                denoiser=denoiser.config.model_dump(mode="json"),
            )
        elif not isinstance(spec, MiroSpec):
            spec = MiroSpec.model_validate(dict(spec))
        self.spec: MiroSpec = spec
        self._check_consistency()
        self.denoiser.eval()
        if isinstance(text_encoder, torch.nn.Module):
            text_encoder.eval()

    # ------------------------------------------------------------------ checks / properties
    def _check_consistency(self) -> None:
        cfg = self.denoiser.config
        enc = self.text_encoder
        if int(enc.dim) != cfg.text_dim or int(enc.pooled_dim) != cfg.pooled_dim:
            raise ValueError(
                f"text encoder {getattr(enc, 'name', '?')!r} gives tokens of width {enc.dim} and pooled width "
                f"{enc.pooled_dim}, but the denoiser expects text_dim={cfg.text_dim}, pooled_dim={cfg.pooled_dim}"
            )
        if list(self.spec.reward_names) != self.denoiser.reward_names:
            raise ValueError(
                f"miro.json reward_names {self.spec.reward_names} differ from the denoiser's {self.denoiser.reward_names}"
            )
        if self.vae.channels != cfg.in_channels:
            raise ValueError(
                f"codec has {self.vae.channels} channels but the denoiser's in_channels is {cfg.in_channels}"
            )
        side = self.spec.resolution // int(self.vae.downsample)
        if self.spec.resolution % int(self.vae.downsample) or side > cfg.sample_size or side % cfg.patch_size:
            raise ValueError(
                f"resolution {self.spec.resolution} px gives a {side}-cell latent with downsample {self.vae.downsample}; "
                f"it must be an integer ≤ sample_size {cfg.sample_size} divisible by patch_size {cfg.patch_size}"
            )

    @property
    def reward_names(self) -> list[str]:
        """Conditioning rewards of the model, in column order (empty for a baseline)."""
        return self.denoiser.reward_names

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return int(self.spec.resolution)

    @property
    def guidance_mode(self) -> GuidanceMode:
        """``"rewards"`` (MIRO), ``"text"`` (baseline with text dropout) or ``"none"`` (see module doc)."""
        if self.reward_names:
            return "rewards"
        return "text" if self.spec.text_dropout > 0 else "none"

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters (where sampling runs)."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the denoiser's parameters."""
        return next(self.denoiser.parameters()).dtype

    def to(self, *args: Any, **kwargs: Any) -> "MiroPipeline":
        """Move every component to a device; a dtype applies to the denoiser only.

        Text encoders and the VAE stay float32 (the SDXL VAE overflows in fp16); with a bf16/fp16
        denoiser, :meth:`__call__` runs the denoiser under autocast. Returns ``self``.
        """
        device, dtype = _parse_to_args(args, dict(kwargs))
        self.denoiser.to(device=device, dtype=dtype)
        if device is not None:
            enc: Any = self.text_encoder
            if isinstance(enc, torch.nn.Module):
                enc.to(device)
            elif hasattr(enc, "model") and hasattr(enc, "device"):
                enc.model.to(device)
                enc.device = device
                if hasattr(enc, "clear_cache"):
                    enc.clear_cache()  # cached tensors live on the old device
            codec: Any = self.vae
            if isinstance(codec, VAECodec):
                codec.vae.to(device)
                codec.device = device
                codec.mean = codec.mean.to(device)
                codec.std = codec.std.to(device)
        return self

    # ------------------------------------------------------------------ conditioning
    def resolve_reward_targets(
        self, targets: Mapping[str, float | None] | None, default: float, field: str = "reward_targets"
    ) -> dict[str, float | None]:
        """Complete ``targets`` with ``default`` for every reward of the model.

        Returns:
            ``{name: value | None}`` in the model's reward order (``None`` = absent).

        Raises:
            ValueError: an unknown reward name (lists the model's rewards) or a value outside
                ``[0, 1]`` (names the reward and the value).
            TypeError: a value that is not a number or ``None``.
        """
        names = self.reward_names
        targets = dict(targets or {})
        unknown = sorted(set(targets) - set(names))
        if unknown:
            keys = ", ".join(names) if names else "(none: a baseline model without rewards)"
            raise ValueError(f"{field}: unknown reward(s) {unknown}; this model's rewards are: {keys}")
        out: dict[str, float | None] = {}
        for name in names:
            value = targets.get(name, default)
            if value is None:
                out[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{field}[{name!r}] must be a number in [0, 1] or None (absent), got {value!r}")
            v = float(value)
            if math.isnan(v):
                out[name] = None  # NaN = absent, like None
            elif not 0.0 <= v <= 1.0:
                raise ValueError(
                    f"{field}[{name!r}] = {v} is outside [0, 1] (targets are conditioning values; None = absent)"
                )
            else:
                out[name] = v
        return out

    def _reward_tensor(self, resolved: Mapping[str, float | None], n: int) -> Tensor:
        """``[n, R]`` float32 on the device; NaN where absent."""
        row = [float("nan") if resolved[k] is None else float(resolved[k]) for k in self.reward_names]  # type: ignore[arg-type]
        return torch.tensor(row, dtype=torch.float32, device=self.device).unsqueeze(0).expand(n, len(row)).contiguous()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> TextEmbedding:
        """Captions -> :class:`TextEmbedding` (tokens ``[B, L, D]``, mask ``[B, L]``, pooled ``[B, Dp]``) on the device."""
        emb = self.text_encoder.encode(list(prompts))
        return TextEmbedding(emb.tokens.detach().float(), emb.mask.detach().bool(), emb.pooled.detach().float()).to(
            self.device
        )

    def prepare_latents(
        self,
        n: int,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        """Initial noise ``x_1 [n, C, h, w]`` float32 on the device.

        With a list of generators, row ``k`` is drawn from ``generator[k]`` alone, so an image
        depends on its own generator only (not on the batch it was generated in).
        """
        cfg = self.denoiser.config
        side = self.resolution // int(self.vae.downsample)
        shape = (n, cfg.in_channels, side, side)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=self.device, dtype=torch.float32)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(
                    f"got {len(generator)} generators for {n} images (need one per image, or a single one)"
                )
            rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
            return torch.stack(rows).to(device=self.device, dtype=torch.float32)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}"
            )
        draw = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=draw).to(device=self.device, dtype=torch.float32)

    def _velocity(
        self,
        x: Tensor,
        t: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        pooled: Tensor,
        rewards: Tensor | None = None,
    ) -> Tensor:
        """One denoiser forward: ``x [N, C, h, w]``, ``t [N]`` -> ``v [N, C, h, w]`` float32."""
        dtype = self.dtype
        low = dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=low):
            v = self.denoiser(x, t.float(), text_tokens, text_mask, pooled, rewards)
        return v.float()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reward_targets: Mapping[str, float | None] | None = None,
        negative_reward_targets: Mapping[str, float | None] | None = None,
        guidance_scale: float = 0.0,
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: OutputType = "np",
        return_dict: bool = True,
        latents: Tensor | None = None,
        timestep_shift: float = 1.0,
        guidance_schedule: GuidanceSchedule = "constant",
        guidance_interval: Sequence[float] | None = None,
        guidance_decay: GuidanceDecay = "linear",
    ) -> MiroPipelineOutput | tuple[Any]:
        """Generate images.

        Args:
            prompt: one caption or a list of B captions.
            reward_targets: positive targets ``s⁺`` in [0, 1] by reward name; unspecified = 1.0,
                ``None`` = absent.
            negative_reward_targets: ``s⁻``; unspecified = 0.0, ``None`` = absent.
            guidance_scale: ω in ``v⁺ + ω·(v⁺ − v⁻)`` (0 = no guidance, one forward per step).
            num_inference_steps: Euler steps.
            num_images_per_prompt: images per caption (N = B · this).
            generator: one ``torch.Generator`` for the whole batch, or a list of N (one per image).
            output_type: ``"np"`` (``[N, H, W, 3]`` float32), ``"pt"`` (``[N, 3, H, W]``), ``"pil"``.
            return_dict: return :class:`MiroPipelineOutput` (else a 1-tuple).
            latents: optional initial noise ``[N, C, h, w]``.
            timestep_shift: SD3-style shift of the time grid (1 = uniform).
            guidance_schedule: how ω varies with the flow time ``t`` (1 = noise, 0 = data), see
                :func:`guidance_weight`: ``"constant"`` (default, today's sampler bit for bit),
                ``"interval"`` (ω only for ``t`` in ``guidance_interval``, else the positive branch
                alone, one forward of N rows) or ``"damped"`` (``ω·f(t)``, ``f`` from ``guidance_decay``).
            guidance_interval: ``[t_lo, t_hi]`` with ``0 <= t_lo < t_hi <= 1`` (``None`` = ``[0, 1]``).
            guidance_decay: ``"linear"`` or ``"cosine"`` (the damped schedule's ``f``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if isinstance(num_images_per_prompt, bool) or int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        omega = float(guidance_scale)
        if not math.isfinite(omega) or omega < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        schedule, interval, decay = check_guidance_schedule(guidance_schedule, guidance_interval, guidance_decay)
        pos_t = self.resolve_reward_targets(reward_targets, 1.0, "reward_targets")
        neg_t = self.resolve_reward_targets(negative_reward_targets, 0.0, "negative_reward_targets")
        mode = self.guidance_mode
        if omega > 0 and mode == "none":
            raise ValueError(
                f"guidance_scale={omega} needs a negative branch, but this baseline model has no rewards and was "
                "trained with text_dropout=0 (no unconditional branch); use guidance_scale=0"
            )

        k = int(num_images_per_prompt)
        n = len(prompts) * k
        emb = self.encode_prompt(prompts)
        cond_pos: dict[str, Tensor] = {
            "text_tokens": emb.tokens.repeat_interleave(k, dim=0),
            "text_mask": emb.mask.repeat_interleave(k, dim=0),
            "pooled": emb.pooled.repeat_interleave(k, dim=0),
        }
        cond_neg = dict(cond_pos)
        if mode == "rewards":
            cond_pos["rewards"] = self._reward_tensor(pos_t, n)
            cond_neg["rewards"] = self._reward_tensor(neg_t, n)
        elif mode == "text" and omega > 0:
            empty = self.encode_prompt([""])
            cond_neg = {
                "text_tokens": empty.tokens.expand(n, -1, -1),
                "text_mask": empty.mask.expand(n, -1),
                "pooled": empty.pooled.expand(n, -1),
            }

        x_init = self.prepare_latents(n, generator, latents)
        if schedule == "constant" or omega == 0:
            guided = cfg_model_fn(self._velocity, cond_pos, cond_neg, omega)
        else:
            guided = scheduled_cfg_model_fn(
                self._velocity,
                cond_pos,
                cond_neg,
                lambda t: guidance_weight(omega, t, schedule, interval, decay),
            )
        steps = int(num_inference_steps)
        with self.progress_bar(total=steps) as bar:

            def step_fn(x: Tensor, t: Tensor) -> Tensor:
                v = guided(x, t)
                bar.update()
                return v

            x0 = euler_sample(
                step_fn, tuple(x_init.shape), steps=steps, device=self.device, x_init=x_init, shift=timestep_shift
            )
        images = self.vae.decode(x0).float().clamp(0.0, 1.0)  # [N, 3, H, W] in [0, 1]

        out: Any
        if output_type == "pt":
            out = images.cpu()
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "np":
                out = arr
            else:
                from PIL import Image

                out = [Image.fromarray(np.round(a * 255.0).astype(np.uint8)) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return MiroPipelineOutput(images=out)

    # ------------------------------------------------------------------ save / load
    def _index(self) -> dict[str, Any]:
        import diffusers

        comps = {name: list(self.config[name]) for name in ("denoiser", "text_encoder", "vae")}
        return {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__, "components": comps}

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        storage: Storage | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the pipeline (layout in the module doc) to a local directory or any storage URI.

        Raises:
            ValueError: ``safe_serialization=False`` (only safetensors are written) or
                unsupported diffusers options (``push_to_hub``, ``variant``...).
        """
        if not safe_serialization:
            raise ValueError(
                "MiroPipeline.save_pretrained writes safetensors only (safe_serialization=False is not supported)"
            )
        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unsupported:
            raise ValueError(f"MiroPipeline.save_pretrained does not support {unsupported}")
        target = str(save_directory)
        st = storage or Storage()
        local = st.local_path(target)
        if local is not None:
            self._save_local(local)
            return
        st.delete(join_uri(target, MIRO_JSON))  # the target is incomplete until miro.json is rewritten
        with tempfile.TemporaryDirectory(prefix="miropipe-") as tmp:
            root = Path(tmp)
            self._save_local(root)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == MIRO_JSON)  # miro.json last
            for p in files:
                st.write_bytes(join_uri(target, p.relative_to(root).as_posix()), p.read_bytes())

    def _save_local(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / MIRO_JSON).unlink(missing_ok=True)  # incomplete until rewritten last
        self.denoiser.save_pretrained(d / "denoiser")
        spec = self.spec.model_dump(mode="json")
        spec["denoiser"] = self.denoiser.config.model_dump(mode="json")
        enc: Any = self.text_encoder
        if isinstance(enc, LearnedTokenEncoder):
            enc.save_pretrained(d / "text_encoder")
        if isinstance(self.vae, VAECodec):
            self.vae.vae.save_pretrained(str(d / "vae"), safe_serialization=True)
            self.vae.save_stats(d / "vae" / LATENT_STATS_JSON)
            spec["latent_stats"] = {"mean": self.vae.mean.tolist(), "std": self.vae.std.tolist()}
        spec["pipeline"] = self._index()
        tmp = d / (MIRO_JSON + ".tmp")
        tmp.write_text(json.dumps(spec, indent=2) + "\n")
        tmp.replace(d / MIRO_JSON)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        storage: Storage | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "MiroPipeline":
        """Load a directory written by :meth:`save_pretrained` (local path or storage URI).

        A checkpoint directory (``ema/`` and no ``denoiser/``) is accepted too and loads EMA
        weights (see :meth:`from_checkpoint`).
        """
        if kwargs:
            raise ValueError(f"MiroPipeline.from_pretrained got unsupported argument(s) {sorted(kwargs)}")
        return load_pipeline(str(pretrained_model_name_or_path), storage=storage, device=device, prefer="denoiser")

    @classmethod
    def from_checkpoint(
        cls,
        uri: str,
        storage: Storage | None = None,
        device: str | torch.device | None = None,
    ) -> "MiroPipeline":
        """Build a pipeline from a training checkpoint ``<run>/checkpoints/step-XXXXXXXX/`` (or ``final/``).

        Reads ``miro.json`` and the EMA weights from ``ema/`` (and ``ema_text_encoder/``, else
        ``text_encoder/``, for a learned encoder) from any storage URI; ``denoiser/`` and
        ``train_state.pt`` are not downloaded; remote files are downloaded to a temporary directory.

        Raises:
            FileNotFoundError: no ``miro.json`` (incomplete checkpoint) or no ``ema/`` weights.
        """
        return load_pipeline(uri, storage=storage, device=device, prefer="ema")
