"""MIRO denoiser: a diffusers ``SD3Transformer2DModel`` (MMDiT) conditioned on text and rewards.

Conditioning paths (no training code lives here):

* **Text tokens** ``[B, L, Dt]`` are the joint-attention stream (``joint_attention_dim = Dt``).
  SD3's joint attention has no mask, so we (1) zero the padded token vectors and (2) install
  :class:`MaskedJointAttnProcessor`, our copy of diffusers' ``JointAttnProcessor2_0`` that takes a
  key mask: no image or text query attends to a padded text key. With ``mask_text=False`` only
  (1) is done and padded tokens act as identical "register" tokens (what SD3 itself does).
* **Timestep** ``t ∈ [0, 1]`` is passed as ``1000·t``, the scale SD3's sinusoidal timestep
  embedding was designed for.
* **Rewards** ``[B, R]`` (NaN = absent) go through :class:`RewardEmbedder` to
  ``[B, pooled_dim]`` and are **added to the pooled text vector** before SD3's pooled projection
  (``Linear -> SiLU -> Linear``). The sum of that projection and the timestep embedding is the
  adaLN conditioning of every block, so rewards modulate every layer exactly like the timestep.
  ``DenoiserConfig.reward_features`` picks the embedder's feature mode: :func:`create_denoiser`
  builds ``"grid_interp"`` (smooth between the ``k / reward_grid`` values the model trains on); a
  ``config.json`` without the key was written by the original ``"fourier"`` embedding and loads as
  that, so old checkpoints sample exactly as before (docs/fidelity.md, "Reward embedding").
* **Initialisation** follows DiT: xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP,
  and *zero* adaLN modulation linears (every block's ``norm1`` / ``norm1_context`` and
  ``norm_out``) and output projection, so every block starts as the identity and the model
  outputs ``v = 0`` at init. The reward MLPs' last layers and null/position embeddings are zero
  too, so a fresh MIRO model computes the same function as the baseline (``reward_names=[]``).

Sizes live in :data:`MODEL_SIZES`; ``create_denoiser`` builds one by name. Checkpoints are
``config.json`` + ``model.safetensors`` (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from miroflow.models.reward_embedding import RewardEmbedder, RewardFeatures

__all__ = [
    "MODEL_SIZES",
    "BACKBONES",
    "DenoiserConfig",
    "MiroDenoiser",
    "MaskedJointAttnProcessor",
    "create_denoiser",
    "count_params",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: Architecture presets. ``in_channels``/``sample_size`` are defaults a caller may override.
MODEL_SIZES: dict[str, dict[str, int]] = {
    # CPU tests / demo: 32 px RGB pixel space, 8x8 = 64 image tokens, width 64.
    "tiny": dict(
        in_channels=3, sample_size=32, patch_size=4, num_layers=3, attention_head_dim=32, num_attention_heads=2
    ),
    # CPU studies: width 128.
    "small": dict(
        in_channels=3, sample_size=32, patch_size=4, num_layers=4, attention_head_dim=32, num_attention_heads=4
    ),
    # Paper scale: SDXL-VAE latents 4x32x32 (256 px), patch 2 -> 256 tokens, width 1024, 10 layers.
    "paper": dict(
        in_channels=4,
        sample_size=32,
        patch_size=2,
        num_layers=10,
        attention_head_dim=64,
        num_attention_heads=16,
        reward_hidden_dim=256,
    ),
}

#: Backbones by name (only SD3's MMDiT for now).
BACKBONES: tuple[str, ...] = ("sd3",)


class DenoiserConfig(BaseModel):
    """Everything needed to rebuild a :class:`MiroDenoiser` (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    size: str = Field("tiny", description="Preset name from MODEL_SIZES (informational once built).")
    backbone: Literal["sd3"] = Field("sd3", description="Backbone architecture.")
    in_channels: int = Field(3, ge=1, description="Channels of x_t (3 for pixels, 4 for SDXL-VAE latents).")
    sample_size: int = Field(32, ge=1, description="Spatial side of x_t (pixels or latent cells).")
    patch_size: int = Field(4, ge=1, description="Patch side; sample_size must be divisible by it.")
    num_layers: int = Field(3, ge=1, description="Number of joint transformer blocks.")
    attention_head_dim: int = Field(32, ge=1, description="Width per attention head.")
    num_attention_heads: int = Field(2, ge=1, description="Heads; width = heads * head_dim.")
    text_dim: int = Field(384, ge=1, description="Width of text tokens (joint_attention_dim).")
    pooled_dim: int = Field(384, ge=1, description="Width of the pooled text vector (pooled_projection_dim).")
    reward_names: list[str] = Field(
        default_factory=list, description="Conditioning rewards in column order; [] = baseline."
    )
    num_frequencies: int = Field(16, ge=1, description="Fourier frequencies per reward value.")
    reward_features: RewardFeatures = Field(
        "fourier",
        description="Reward embedding mode: 'grid_interp' (what create_denoiser builds) interpolates the MLP "
        "embeddings of the two neighbouring k/reward_grid values; 'fourier' feeds the value itself. A config "
        "without this key predates it and is 'fourier'.",
    )
    reward_grid: int = Field(
        63, ge=1, description="G of the k/G grid of conditioning values (score.num_bins - 1); grid_interp only."
    )
    reward_hidden_dim: int | None = Field(
        None, ge=1, description="Hidden width of each reward MLP; null = transformer width."
    )
    mask_text: bool = Field(True, description="Mask padded text tokens out of joint attention.")

    @model_validator(mode="after")
    def _check_geometry(self) -> "DenoiserConfig":
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not divisible by patch_size {self.patch_size}")
        if len(set(self.reward_names)) != len(self.reward_names):
            raise ValueError(f"reward_names contains duplicates: {self.reward_names}")
        return self

    @property
    def width(self) -> int:
        """Transformer width ``heads * head_dim``."""
        return self.num_attention_heads * self.attention_head_dim


class MaskedJointAttnProcessor:
    """``JointAttnProcessor2_0`` with a key mask for the joint (image + text) sequence.

    ``attention_mask``: bool ``[B, 1, 1, N_img + L]`` (True = attend) or None (no masking).
    Image keys are always valid, so no query row is ever fully masked.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``hidden_states[B, N, W]``, ``encoder_hidden_states[B, L, W]`` -> same shapes."""
        residual = hidden_states
        b = hidden_states.shape[0]

        def heads(x: Tensor) -> Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query = torch.cat([query, cq], dim=2)
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            attention_mask = None  # e.g. a self-attention-only call without the text stream
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, ctx = out[:, : residual.shape[1]], out[:, residual.shape[1] :]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
            out = attn.to_out[1](attn.to_out[0](out))
            return out, ctx
        return attn.to_out[1](attn.to_out[0](out))


class MiroDenoiser(nn.Module):
    """Velocity model ``v(x_t, t, text, rewards)`` for rectified flow (``x_t = (1-t)x + tε``)."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        from diffusers import SD3Transformer2DModel  # heavy import, lazily

        self.config = config
        c = config
        self.backbone = SD3Transformer2DModel(
            sample_size=c.sample_size,
            patch_size=c.patch_size,
            in_channels=c.in_channels,
            num_layers=c.num_layers,
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads,
            joint_attention_dim=c.text_dim,
            caption_projection_dim=c.width,
            pooled_projection_dim=c.pooled_dim,
            out_channels=c.in_channels,
            pos_embed_max_size=c.sample_size // c.patch_size,
        )
        self._init_backbone()
        if c.mask_text:
            processor = MaskedJointAttnProcessor()
            for block in self.backbone.transformer_blocks:
                block.attn.set_processor(processor)
        # Created after the backbone so a baseline and a MIRO model with the same seed share
        # identical backbone weights.
        self.reward_embedder = RewardEmbedder(
            c.reward_names,
            dim=c.pooled_dim,
            num_frequencies=c.num_frequencies,
            hidden_dim=c.reward_hidden_dim or c.width,
            features=c.reward_features,
            grid=c.reward_grid,
        )

    # ------------------------------------------------------------------ init
    def _init_backbone(self) -> None:
        """DiT initialisation: xavier linears, N(0,0.02) timestep MLP, zero adaLN + output."""
        bb = self.backbone
        with torch.no_grad():
            for m in bb.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            proj = bb.pos_embed.proj  # Conv2d patchify, initialised like a linear layer
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
            nn.init.zeros_(proj.bias)
            temb = bb.time_text_embed.timestep_embedder
            nn.init.normal_(temb.linear_1.weight, std=0.02)
            nn.init.normal_(temb.linear_2.weight, std=0.02)
            for block in bb.transformer_blocks:
                for norm in (block.norm1, block.norm1_context):
                    nn.init.zeros_(norm.linear.weight)
                    nn.init.zeros_(norm.linear.bias)
            nn.init.zeros_(bb.norm_out.linear.weight)
            nn.init.zeros_(bb.norm_out.linear.bias)
            nn.init.zeros_(bb.proj_out.weight)
            nn.init.zeros_(bb.proj_out.bias)

    # ------------------------------------------------------------ properties
    @property
    def reward_names(self) -> list[str]:
        """Conditioning rewards in column order (empty for the baseline)."""
        return list(self.config.reward_names)

    @property
    def num_rewards(self) -> int:
        """R, the number of reward columns ``forward`` expects."""
        return len(self.config.reward_names)

    # --------------------------------------------------------------- forward
    def _validate(
        self,
        x_t: Tensor,
        t: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor | None,
        pooled: Tensor,
        rewards: Tensor | None,
    ) -> Tensor:
        c = self.config
        if x_t.dim() != 4 or x_t.shape[1] != c.in_channels:
            raise ValueError(f"x_t must have shape [B, {c.in_channels}, H, W], got {tuple(x_t.shape)}")
        b, _, h, w = x_t.shape
        if h % c.patch_size or w % c.patch_size or h > c.sample_size or w > c.sample_size:
            raise ValueError(
                f"x_t spatial size {h}x{w} must be divisible by patch_size {c.patch_size} and at most sample_size {c.sample_size}"
            )
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B]=[{b}] (floats in [0, 1]), got {tuple(t.shape)}")
        if text_tokens.dim() != 3 or text_tokens.shape[0] != b or text_tokens.shape[2] != c.text_dim:
            raise ValueError(f"text_tokens must have shape [{b}, L, {c.text_dim}], got {tuple(text_tokens.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
            raise ValueError(
                f"text_mask must have shape {tuple(text_tokens.shape[:2])} (like text_tokens[:, :, 0]), got {tuple(text_mask.shape)}"
            )
        if pooled.dim() != 2 or pooled.shape != (b, c.pooled_dim):
            raise ValueError(f"pooled must have shape [{b}, {c.pooled_dim}], got {tuple(pooled.shape)}")
        if rewards is not None and (rewards.dim() != 2 or rewards.shape != (b, self.num_rewards)):
            raise ValueError(
                f"rewards must have shape [{b}, {self.num_rewards}] (columns {self.reward_names}; NaN = absent), got {tuple(rewards.shape)}"
            )
        return t

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor | None,
        pooled: Tensor,
        rewards: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity ``v = ε - x``.

        Args:
            x_t: noisy input ``[B, C, H, W]`` (H, W ≤ sample_size, divisible by patch_size).
            t: time ``[B]`` (or a scalar) in ``[0, 1]``; 0 = data, 1 = noise.
            text_tokens: ``[B, L, text_dim]``.
            text_mask: bool ``[B, L]`` (True = real token) or None (all real).
            pooled: pooled text vector ``[B, pooled_dim]``.
            rewards: ``[B, R]`` values in ``[0, 1]``, NaN = absent; None = all absent.
        Returns:
            velocity ``[B, C, H, W]``.
        """
        t = self._validate(x_t, t, text_tokens, text_mask, pooled, rewards)
        b, _, h, w = x_t.shape
        dtype = x_t.dtype
        if rewards is None:
            rewards = torch.full((b, self.num_rewards), float("nan"), device=x_t.device, dtype=torch.float32)
        cond = pooled.to(dtype) + self.reward_embedder(rewards).to(dtype)  # [B, pooled_dim]
        kwargs: dict[str, Any] | None = None
        if text_mask is not None:
            text_mask = text_mask.to(device=x_t.device, dtype=torch.bool)
            text_tokens = text_tokens * text_mask.unsqueeze(-1).to(text_tokens.dtype)
            if self.config.mask_text:
                n_img = (h // self.config.patch_size) * (w // self.config.patch_size)
                keys = torch.cat([text_mask.new_ones(b, n_img), text_mask], dim=1)  # [B, N+L]
                kwargs = {"attention_mask": keys[:, None, None, :]}
        out = self.backbone(
            hidden_states=x_t,
            encoder_hidden_states=text_tokens.to(dtype),
            pooled_projections=cond,
            timestep=t.to(dtype) * 1000.0,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        return out

    # ----------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``; returns it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = d / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "miroflow": "MiroDenoiser"})
        tmp.replace(d / WEIGHTS_NAME)
        (d / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> "MiroDenoiser":
        """Rebuild from ``config.json`` and load ``model.safetensors`` strictly."""
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"denoiser checkpoint file missing: {d / name}")
        config = DenoiserConfig.model_validate_json((d / CONFIG_NAME).read_text())
        model = cls(config)
        model.load_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model


def create_denoiser(
    size: str,
    reward_names: list[str] | None = None,
    text_dim: int = 384,
    pooled_dim: int = 384,
    in_channels: int | None = None,
    sample_size: int | None = None,
    reward_features: RewardFeatures = "grid_interp",
    reward_grid: int = 63,
    **overrides: Any,
) -> MiroDenoiser:
    """Build a new denoiser from a :data:`MODEL_SIZES` preset.

    ``in_channels`` / ``sample_size`` default to the preset's; ``overrides`` may set any other
    :class:`DenoiserConfig` field (e.g. ``num_layers``). ``reward_names=[]`` = baseline. New models
    get the ``"grid_interp"`` reward embedding on the ``k / reward_grid`` grid (``reward_grid`` =
    ``score.num_bins - 1``); pass ``reward_features="fourier"`` for the original embedding.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; valid: {', '.join(MODEL_SIZES)}")
    fields: dict[str, Any] = dict(MODEL_SIZES[size])
    if in_channels is not None:
        fields["in_channels"] = in_channels
    if sample_size is not None:
        fields["sample_size"] = sample_size
    fields.update(overrides)
    fields.update(reward_features=reward_features, reward_grid=reward_grid)
    config = DenoiserConfig(
        size=size, text_dim=text_dim, pooled_dim=pooled_dim, reward_names=list(reward_names or []), **fields
    )
    return MiroDenoiser(config)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
