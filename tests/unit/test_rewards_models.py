"""Real reward-model loaders, exercised offline with tiny random-weight models of the same architectures."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the network, even by accident
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from miroflow.rewards import Reward, create_reward
from miroflow.rewards.models import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticHead,
    ClipScoreReward,
    HPSv2Reward,
    ImageRewardReward,
    LaionAestheticReward,
    MissingWeightsError,
    OpenClipTowers,
    PickScoreReward,
)

open_clip = pytest.importorskip("open_clip")

TINY_MODEL = "miroflow-tiny-test"
EMBED = 32
VISION = dict(image_size=64, layers=2, width=64, patch_size=16, head_width=32)
TEXT = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)
PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle left of a yellow circle",
    "three red squares",
    "a cat",
    "noise",
]
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` random images quantised to k/255 (so uint8 round trips are exact)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[Any, Any]:
    """A random tiny ``open_clip.CLIP`` and the bundled tokenizer."""
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=EMBED, vision_cfg=dict(VISION), text_cfg=dict(TEXT)).eval()
    return model, open_clip.SimpleTokenizer(context_length=TEXT["context_length"])


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the tiny architecture under a model name, as an open_clip JSON config."""
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / f"{TINY_MODEL}.json").write_text(json.dumps({"embed_dim": EMBED, "vision_cfg": VISION, "text_cfg": TEXT}))
    open_clip.add_model_config(d)
    return TINY_MODEL


def _hand_cos(model: Any, tokenizer: Any, images: torch.Tensor, prompts: list[str], size: int) -> torch.Tensor:
    """cos(image, text) computed directly from the model's encoders (independent of the reward code)."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - MEAN) / STD
    with torch.no_grad():
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return (img * txt).sum(-1)


# ----------------------------------------------------------------------------- open_clip preprocessing
def test_open_clip_preprocess_resize_and_normalise(tiny_clip: tuple[Any, Any]) -> None:
    model, tok = tiny_clip
    towers = OpenClipTowers(model, tok, device="cpu")
    assert towers.image_size == (64, 64)
    # constant image → (c − mean) / std per channel, resized to the tower's size
    c = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    pre = towers.preprocess(c)
    assert pre.shape == (2, 3, 64, 64)
    torch.testing.assert_close(pre, ((c[:, :, :1, :1] - MEAN) / STD).expand(2, 3, 64, 64), atol=1e-5, rtol=0)
    # non-square: shorter side to 64, then center crop; a centred vertical stripe stays centred
    x = torch.zeros(1, 3, 32, 64)
    x[..., 28:36] = 1.0
    pre = towers.preprocess(x)
    assert pre.shape == (1, 3, 64, 64)
    row = pre[0, 0, 32]
    assert row[32] > row[0] and torch.allclose(row, row.flip(0), atol=1e-4)


# ----------------------------------------------------------------------------- clip_score / hpsv2 / aesthetic
def test_clip_score_matches_hand_computation(tiny_clip: tuple[Any, Any]) -> None:
    model, tok = tiny_clip
    r = ClipScoreReward(OpenClipTowers(model, tok, device="cpu"), version="test")
    assert isinstance(r, Reward) and r.uses_prompt
    imgs = _images(len(PROMPTS))
    raw = r.score(imgs, PROMPTS)
    cos = _hand_cos(model, tok, imgs, PROMPTS, 64)
    want = 100.0 * cos.clamp_min(0)
    assert (want > 0).any() and (cos < 0).any(), cos  # both branches of the clip are exercised
    assert raw.dtype == torch.float32 and raw.shape == (len(PROMPTS),)
    torch.testing.assert_close(raw, want, atol=1e-4, rtol=1e-5)  # 1e-4 on a 0–100 scale = 1e-6 in cos
    torch.testing.assert_close(r.normalize(raw), (want / 100).clamp(0, 1), atol=1e-6, rtol=0)
    # the prompt matters: scoring against shifted prompts changes the values
    assert not torch.allclose(r.score(imgs, PROMPTS[1:] + PROMPTS[:1]), raw)


def test_hpsv2_matches_hand_computation(tiny_clip: tuple[Any, Any]) -> None:
    model, tok = tiny_clip
    r = HPSv2Reward(OpenClipTowers(model, tok, device="cpu"), version="test")
    imgs = _images(3, seed=1)
    raw = r.score(imgs, PROMPTS[:3])
    torch.testing.assert_close(raw, _hand_cos(model, tok, imgs, PROMPTS[:3], 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.normalize(torch.tensor([-0.1, 0.27, 1.4])), torch.tensor([0.0, 0.27, 1.0]))


def test_aesthetic_matches_hand_computation(tiny_clip: tuple[Any, Any]) -> None:
    model, tok = tiny_clip
    torch.manual_seed(1)
    head = AestheticHead(in_dim=EMBED).eval()
    r = LaionAestheticReward(OpenClipTowers(model, tok, device="cpu"), head, version="test")
    assert r.uses_prompt is False
    imgs = _images(3, seed=2)
    raw = r.score(imgs, ["", "", ""])
    x = (
        F.interpolate(imgs, size=(64, 64), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1) - MEAN
    ) / STD
    with torch.no_grad():
        emb = model.encode_image(x)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        h = emb
        for layer in head.layers:  # Linear/Dropout(eval) chain, written out
            h = layer(h)
    torch.testing.assert_close(raw, h[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.normalize(torch.tensor([-1.0, 5.0, 12.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_aesthetic_head_architecture() -> None:
    head = AestheticHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.2.weight": (128, 1024),
        "layers.4.weight": (64, 128),
        "layers.6.weight": (16, 64),
        "layers.7.weight": (1, 16),
    }


# ----------------------------------------------------------------------------- real loaders from files
def test_open_clip_loaders_from_files(tiny_clip: tuple[Any, Any], tiny_config_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, tok = tiny_clip
    imgs = _images(3, seed=3)
    prompts = PROMPTS[:3]
    cos = _hand_cos(model, tok, imgs, prompts, 64)

    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    r = create_reward("clip_score", weights=str(ckpt), device="cpu", model_name=tiny_config_dir)
    assert isinstance(r, ClipScoreReward) and "tiny_clip.pt" in r.version
    torch.testing.assert_close(r.score(imgs, prompts), 100 * cos.clamp_min(0), atol=1e-4, rtol=1e-5)

    # HPSv2: a {"state_dict": ...} checkpoint found by version in a directory
    hps_dir = tmp_path / "hps"
    hps_dir.mkdir()
    torch.save({"state_dict": model.state_dict()}, hps_dir / "HPS_v2_compressed.pt")
    r = create_reward("hpsv2", weights=str(hps_dir), device="cpu", version="v2.0", model_name=tiny_config_dir)
    assert r.version.startswith("hpsv2-v2.0") and "HPS_v2_compressed.pt" in r.version
    torch.testing.assert_close(r.score(imgs, prompts), cos, atol=1e-5, rtol=0)
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt"):
        create_reward("hpsv2", weights=str(hps_dir), device="cpu", version="v2.1", model_name=tiny_config_dir)

    # LAION aesthetic: head (safetensors) + tower checkpoint side by side in one directory
    aes_dir = tmp_path / "aes"
    aes_dir.mkdir()
    torch.manual_seed(2)
    head = AestheticHead(in_dim=EMBED).eval()
    save_file(head.state_dict(), str(aes_dir / "aesthetic_head.safetensors"))
    torch.save(model.state_dict(), aes_dir / "open_clip_pytorch_model.bin")
    r = create_reward("laion_aesthetic", weights=str(aes_dir), device="cpu", model_name=tiny_config_dir)
    with torch.no_grad():
        x = (
            F.interpolate(imgs, size=(64, 64), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1) - MEAN
        ) / STD
        want = head(F.normalize(model.encode_image(x), dim=-1))[:, 0]
    torch.testing.assert_close(r.score(imgs, prompts), want, atol=1e-5, rtol=0)
    # the .pth route (torch.load weights_only) of the released head format
    torch.save(head.state_dict(), tmp_path / "head.pth")
    torch.testing.assert_close(
        AestheticHead.from_file(str(tmp_path / "head.pth")).state_dict()["layers.7.weight"], head.layers[7].weight
    )


def test_open_clip_loader_rejects_wrong_architecture(tiny_config_dir: str, tmp_path: Path) -> None:
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        create_reward("clip_score", weights=str(tmp_path / "bad.pt"), device="cpu", model_name=tiny_config_dir)


@pytest.mark.parametrize("name", ["clip_score", "laion_aesthetic", "pickscore", "hpsv2"])
def test_missing_weights_message(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist" / "model.pt"
    with pytest.raises(MissingWeightsError) as exc:
        create_reward(name, weights=str(missing), device="cpu")
    msg = str(exc.value)
    assert str(missing) in msg and f"score.reward_weights.{name}" in msg and "\n" not in msg
    with pytest.raises(MissingWeightsError, match=rf"score\.reward_weights\.{name}"):
        create_reward(name, weights=None, device="cpu")


# ----------------------------------------------------------------------------- pickscore (transformers)
def _write_tiny_clip_tokenizer(d: Path) -> Any:
    """A CLIP BPE tokenizer over letters + a few merges, written as vocab.json/merges.txt."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("t", "w"), ("tw", "o</w>")]
    tokens += ["".join(m) for m in merges]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")), len(tokens)


@pytest.fixture(scope="module")
def tiny_pickscore_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("pickscore")
    tok, vocab = _write_tiny_clip_tokenizer(d)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=48,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(70.0)))  # not 100, so the learned scale must be used
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(d)
    return d


def test_pickscore_loader_matches_reference_processing(tiny_pickscore_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    r = create_reward("pickscore", weights=str(tiny_pickscore_dir), device="cpu")
    assert isinstance(r, PickScoreReward) and r.version == f"pickscore:{tiny_pickscore_dir.name}"
    assert r.crop_size == (48, 48) and r.resize_shorter == 48
    prompts = ["a red circle", "two blue squares", "a cat"]
    imgs = _images(3, size=48, seed=4)  # already at the tower's size: the HF processor is exact here
    raw = r.score(imgs, prompts)

    # Hand computation with the checkpoint's own processor (PIL path) and encoders.
    model = CLIPModel.from_pretrained(tiny_pickscore_dir, local_files_only=True).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_pickscore_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_pickscore_dir, local_files_only=True)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]
    pixel = proc(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(r.preprocess(imgs), pixel, atol=1e-5, rtol=0)
    text = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():  # the PickScore reference: logit_scale.exp() · text_embs @ image_embs.T, diagonal
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixel)
        want = out.logits_per_image.diagonal()
        assert torch.allclose(model.logit_scale.exp(), torch.tensor(70.0))
    torch.testing.assert_close(raw, want.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r.normalize(raw), (want / 100).clamp(0, 1).float(), atol=1e-6, rtol=0)

    # 32-px inputs are resized (bicubic) to the tower's 48 px
    small = _images(2, size=32, seed=5)
    pre = r.preprocess(small)
    assert pre.shape == (2, 3, 48, 48)
    hand = (
        F.interpolate(small, size=(48, 48), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1) - MEAN
    ) / STD
    torch.testing.assert_close(pre, hand, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- image_reward (optional)
def test_image_reward_normalisation() -> None:
    torch.testing.assert_close(
        ImageRewardReward.normalize(torch.tensor([-3.0, -2.0, 0.0, 1.0, 2.0, 5.0])),
        torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]),
    )


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="image-reward is installed")
def test_image_reward_missing_package_error() -> None:
    with pytest.raises(ImportError, match=r"pip install miroflow\[imagereward\]"):
        create_reward("image_reward", weights="ImageReward-v1.0", device="cpu")
