"""Models: text encoders, latent codecs, the reward embedder and the MIRO denoiser.

Heavy libraries (transformers, diffusers) are imported lazily inside the constructors, so
importing this package is cheap.
"""

from miroflow.models.denoiser import (
    BACKBONES,
    MODEL_SIZES,
    DenoiserConfig,
    MiroDenoiser,
    count_params,
    create_denoiser,
)
from miroflow.models.reward_embedding import RewardEmbedder
from miroflow.models.text import (
    TEXT_ENCODERS,
    CLIPTextEncoder,
    LearnedTokenEncoder,
    MiniLMEncoder,
    T5Encoder,
    TextEmbedding,
    TextEncoder,
    create_text_encoder,
)
from miroflow.models.vae import CODECS, LatentCodec, PixelCodec, VAECodec, create_codec

__all__ = [
    "BACKBONES",
    "CODECS",
    "MODEL_SIZES",
    "TEXT_ENCODERS",
    "CLIPTextEncoder",
    "DenoiserConfig",
    "LatentCodec",
    "LearnedTokenEncoder",
    "MiniLMEncoder",
    "MiroDenoiser",
    "PixelCodec",
    "RewardEmbedder",
    "T5Encoder",
    "TextEmbedding",
    "TextEncoder",
    "VAECodec",
    "count_params",
    "create_codec",
    "create_denoiser",
    "create_text_encoder",
]
