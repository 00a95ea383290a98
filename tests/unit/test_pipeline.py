"""MiroPipeline: a real diffusers DiffusionPipeline over tiny random MIRO models (CPU, few steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from miroflow.flow import euler_sample, guided_velocity
from miroflow.models import LearnedTokenEncoder, MiroDenoiser, PixelCodec, VAECodec, create_denoiser
from miroflow.pipeline import MiroPipeline, MiroPipelineOutput, load_pipeline

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three red squares"]
DIM = 32
STEPS = 4


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Leave DiT's zero init so the velocity depends on every input (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _denoiser(rewards: list[str], seed: int = 0, **kw: Any) -> MiroDenoiser:
    torch.manual_seed(seed)
    model = create_denoiser("tiny", rewards, text_dim=DIM, pooled_dim=DIM, num_layers=2, **kw)
    _perturb(model, seed + 100)
    return model.eval()


def _encoder(seed: int = 0) -> LearnedTokenEncoder:
    torch.manual_seed(seed)
    enc = LearnedTokenEncoder.from_captions(CAPTIONS, dim=DIM, num_layers=1, num_heads=2, max_length=12)
    return enc.eval()


def _pipe(rewards: list[str] | None = None, text_dropout: float = 0.0, seed: int = 0) -> MiroPipeline:
    rewards = REWARDS if rewards is None else rewards
    den = _denoiser(rewards, seed)
    enc = _encoder(seed)
    pipe = MiroPipeline(denoiser=den, text_encoder=enc, vae=PixelCodec())
    pipe.spec.text_dropout = text_dropout
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _manual(
    pipe: MiroPipeline,
    prompts: list[str],
    pos: torch.Tensor | None,
    neg: torch.Tensor | None,
    omega: float,
    seed: int,
    neg_prompts: list[str] | None = None,
) -> np.ndarray:
    """Reference sampler: separate forwards per branch, guidance by the written formula."""
    n = len(prompts)
    emb = pipe.text_encoder.encode(prompts)
    emb_neg = pipe.text_encoder.encode(neg_prompts) if neg_prompts is not None else emb
    den = pipe.denoiser
    x_init = torch.randn(n, 3, 32, 32, generator=_gen(seed))

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_pos = den(x, t, emb.tokens, emb.mask, emb.pooled, pos)
        if omega == 0:
            return v_pos
        v_neg = den(x, t, emb_neg.tokens, emb_neg.mask, emb_neg.pooled, neg)
        return v_pos + omega * (v_pos - v_neg)

    with torch.no_grad():
        x0 = euler_sample(v, x_init.shape, steps=STEPS, x_init=x_init)
    return ((x0 + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _rows(n: int, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(0).expand(n, len(values)).contiguous()


# ----------------------------------------------------------------------------- basics
def test_is_a_diffusion_pipeline_with_registered_components() -> None:
    pipe = _pipe()
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"denoiser", "text_encoder", "vae"}
    assert pipe.config["denoiser"] == ("miroflow.models.denoiser", "MiroDenoiser")
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.reward_names == REWARDS and pipe.guidance_mode == "rewards"
    assert pipe.spec.resolution == 32 and pipe.spec.text_encoder == "learned"


def test_output_types_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pipe = _pipe()
    out = pipe(CAPTIONS[:2], num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen())
    assert isinstance(out, MiroPipelineOutput)
    assert out.images.shape == (4, 32, 32, 3) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    pt = pipe(CAPTIONS[0], num_inference_steps=STEPS, generator=_gen(), output_type="pt", return_dict=False)[0]
    assert pt.shape == (1, 3, 32, 32)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), out.images[:1], atol=1e-5)  # same generator, first image
    pil = pipe(CAPTIONS[0], num_inference_steps=STEPS, generator=_gen(), output_type="pil").images
    assert len(pil) == 1 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    pipe.set_progress_bar_config(disable=False)
    pipe(CAPTIONS[0], num_inference_steps=3, generator=_gen())
    assert "3/3" in capsys.readouterr().err


def test_images_per_prompt_order_and_per_image_generators() -> None:
    pipe = _pipe()
    gens = [_gen(s) for s in (11, 12, 13)]
    together = pipe([CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]], num_inference_steps=STEPS, generator=gens).images
    alone = pipe([CAPTIONS[1]], num_inference_steps=STEPS, generator=[_gen(12)]).images
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)  # image k depends on its own generator only
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe(CAPTIONS[:2], num_inference_steps=STEPS, generator=gens)


# ----------------------------------------------------------------------------- guidance
def test_omega_zero_is_one_conditional_forward_per_step() -> None:
    pipe = _pipe()
    batches: list[int] = []
    handle = pipe.denoiser.register_forward_hook(lambda m, args, out: batches.append(int(args[0].shape[0])))
    try:
        got = pipe(
            CAPTIONS[:2],
            reward_targets={"contrast": 0.25},
            negative_reward_targets={"sharpness": 0.5},
            guidance_scale=0.0,
            num_inference_steps=STEPS,
            generator=_gen(3),
        ).images
    finally:
        handle.remove()
    assert batches == [2] * STEPS  # one forward of B rows per step, no negative branch
    want = _manual(pipe, CAPTIONS[:2], _rows(2, [1.0, 0.25, 1.0]), None, 0.0, seed=3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batched_guidance_equals_two_pass_formula() -> None:
    pipe = _pipe()
    batches: list[int] = []
    handle = pipe.denoiser.register_forward_hook(lambda m, args, out: batches.append(int(args[0].shape[0])))
    try:
        got = pipe(
            CAPTIONS[:3],
            reward_targets={"contrast": 0.75, "shapes_alignment": None},
            negative_reward_targets={"sharpness": 0.2},
            guidance_scale=2.5,
            num_inference_steps=STEPS,
            generator=_gen(5),
        ).images
    finally:
        handle.remove()
    assert batches == [6] * STEPS  # both branches in ONE forward of 2B rows
    pos = _rows(3, [1.0, 0.75, float("nan")])
    neg = _rows(3, [0.2, 0.0, 0.0])
    want = _manual(pipe, CAPTIONS[:3], pos, neg, 2.5, seed=5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = pipe(CAPTIONS[:3], num_inference_steps=STEPS, generator=_gen(5)).images
    assert np.abs(got - plain).max() > 1e-3  # guidance changed the images


def test_guided_velocity_matches_the_formula_on_denoiser_outputs() -> None:
    pipe = _pipe()
    g = _gen(1)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.7, 0.7])
    emb = pipe.text_encoder.encode(CAPTIONS[:2])
    with torch.no_grad():
        vp = pipe.denoiser(x, t, emb.tokens, emb.mask, emb.pooled, _rows(2, [1.0, 1.0, 1.0]))
        vn = pipe.denoiser(x, t, emb.tokens, emb.mask, emb.pooled, _rows(2, [0.0, 0.0, 0.0]))
    assert not torch.allclose(vp, vn)  # rewards change the velocity of the perturbed model
    torch.testing.assert_close(guided_velocity(vp, vn, 3.0), vp + 3.0 * (vp - vn))


def test_absent_target_uses_null_embedding() -> None:
    pipe = _pipe()
    got = pipe(CAPTIONS[:1], reward_targets={"sharpness": None}, num_inference_steps=STEPS, generator=_gen(2)).images
    want = _manual(pipe, CAPTIONS[:1], _rows(1, [float("nan"), 1.0, 1.0]), None, 0.0, seed=2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ones = pipe(CAPTIONS[:1], num_inference_steps=STEPS, generator=_gen(2)).images
    assert np.abs(got - ones).max() > 1e-4


# ----------------------------------------------------------------------------- validation
def test_unknown_reward_name_lists_the_models_rewards() -> None:
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['aesthetic'\].*sharpness, contrast, shapes_alignment"):
        pipe(CAPTIONS[0], reward_targets={"aesthetic": 1.0}, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_reward_targets.*'hpsv2'"):
        pipe(CAPTIONS[0], negative_reward_targets={"hpsv2": 0.0}, num_inference_steps=1)


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_target_outside_unit_interval_is_an_error(value: float) -> None:
    pipe = _pipe()
    with pytest.raises(ValueError, match=rf"reward_targets\['contrast'\] = {value} is outside \[0, 1\]"):
        pipe(CAPTIONS[0], reward_targets={"contrast": value}, num_inference_steps=1)
    with pytest.raises(TypeError, match="sharpness"):
        pipe(CAPTIONS[0], reward_targets={"sharpness": "high"}, num_inference_steps=1)  # type: ignore[dict-item]


def test_bad_call_arguments() -> None:
    pipe = _pipe()
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(CAPTIONS[0], guidance_scale=-1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(CAPTIONS[0], output_type="latent", num_inference_steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt"):
        pipe([], num_inference_steps=1)


def test_mismatched_components_are_rejected() -> None:
    den = _denoiser(REWARDS)
    enc = LearnedTokenEncoder.from_captions(CAPTIONS, dim=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="text_dim=32"):
        MiroPipeline(denoiser=den, text_encoder=enc, vae=PixelCodec())


# ----------------------------------------------------------------------------- baselines
def test_baseline_without_text_dropout_runs_plain_and_refuses_guidance() -> None:
    pipe = _pipe(rewards=[])
    assert pipe.guidance_mode == "none"
    got = pipe(CAPTIONS[:2], num_inference_steps=STEPS, generator=_gen(4)).images
    np.testing.assert_allclose(got, _manual(pipe, CAPTIONS[:2], None, None, 0.0, seed=4), atol=1e-5)
    with pytest.raises(ValueError, match="text_dropout=0"):
        pipe(CAPTIONS[0], guidance_scale=1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="baseline"):
        pipe(CAPTIONS[0], reward_targets={"sharpness": 1.0}, num_inference_steps=1)


def test_baseline_with_text_dropout_uses_empty_caption_cfg() -> None:
    pipe = _pipe(rewards=[], text_dropout=0.1)
    assert pipe.guidance_mode == "text"
    got = pipe(CAPTIONS[:2], guidance_scale=1.5, num_inference_steps=STEPS, generator=_gen(6)).images
    want = _manual(pipe, CAPTIONS[:2], None, None, 1.5, seed=6, neg_prompts=["", ""])
    np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip_gives_identical_images(tmp_path: Path) -> None:
    pipe = _pipe()
    pipe.spec.text_dropout = 0.05
    kwargs: dict[str, Any] = dict(reward_targets={"contrast": 0.5}, guidance_scale=1.0, num_inference_steps=STEPS)
    before = pipe(CAPTIONS, generator=_gen(7), **kwargs).images
    pipe.save_pretrained(tmp_path / "pipe")
    files = sorted(p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert files == [
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "miro.json",
        "text_encoder/text_encoder.json",
        "text_encoder/text_encoder.safetensors",
    ]
    doc = json.loads((tmp_path / "pipe" / "miro.json").read_text())
    assert doc["reward_names"] == REWARDS and doc["text_dropout"] == 0.05
    assert doc["pipeline"]["_class_name"] == "MiroPipeline"
    assert doc["pipeline"]["components"]["denoiser"] == ["miroflow.models.denoiser", "MiroDenoiser"]
    loaded = MiroPipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.spec.text_dropout == 0.05 and loaded.reward_names == REWARDS
    after = loaded(CAPTIONS, generator=_gen(7), **kwargs).images
    np.testing.assert_array_equal(before, after)


def _write_checkpoint(d: Path, raw: MiroDenoiser, ema: MiroDenoiser, enc: LearnedTokenEncoder) -> None:
    """The documented checkpoint layout (docs/architecture.md), written by hand."""
    raw.save_pretrained(d / "denoiser")
    ema.save_pretrained(d / "ema")
    enc.save_pretrained(d / "ema_text_encoder")
    miro = {
        "format": 1,
        "step": 40,
        "run_name": "tiny-run",
        "text_encoder": "learned",
        "text_max_length": 12,
        "latent": "pixel",
        "vae": None,
        "latent_stats": None,
        "resolution": 32,
        "reward_names": REWARDS,
        "bins": None,
        "text_dropout": 0.0,
        "denoiser": ema.config.model_dump(mode="json"),
    }
    (d / "miro.json").write_text(json.dumps(miro))


def test_from_checkpoint_loads_ema_weights(tmp_path: Path) -> None:
    raw, ema, enc = _denoiser(REWARDS, seed=1), _denoiser(REWARDS, seed=2), _encoder()
    ckpt = tmp_path / "runs" / "tiny-run" / "checkpoints" / "step-00000040"
    _write_checkpoint(ckpt, raw, ema, enc)
    pipe = MiroPipeline.from_checkpoint(str(ckpt), device="cpu")
    assert pipe.spec.step == 40 and pipe.spec.run_name == "tiny-run"
    for (k, a), b in zip(pipe.denoiser.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert not all(torch.equal(a, b) for a, b in zip(pipe.denoiser.state_dict().values(), raw.state_dict().values()))
    # file:// URIs go through the same storage path
    same = MiroPipeline.from_checkpoint("file://" + str(ckpt), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    same.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        pipe(CAPTIONS[0], num_inference_steps=2, generator=_gen()).images,
        same(CAPTIONS[0], num_inference_steps=2, generator=_gen()).images,
    )


def test_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-00000010"
    _write_checkpoint(ckpt, _denoiser(REWARDS), _denoiser(REWARDS), _encoder())
    (ckpt / "miro.json").unlink()
    with pytest.raises(FileNotFoundError, match="miro.json"):
        MiroPipeline.from_checkpoint(str(ckpt), device="cpu")


def test_miro_json_inconsistent_with_weights_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-00000010"
    _write_checkpoint(ckpt, _denoiser(REWARDS), _denoiser(REWARDS), _encoder())
    doc = json.loads((ckpt / "miro.json").read_text())
    doc["reward_names"] = ["sharpness"]
    (ckpt / "miro.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="reward_names"):
        load_pipeline(str(ckpt), device="cpu")


def _tiny_vae_dir(tmp_path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    d = tmp_path / "vae_src"
    vae.save_pretrained(str(d))
    return d


def test_vae_latent_pipeline_round_trip(tmp_path: Path) -> None:
    codec = VAECodec(str(_tiny_vae_dir(tmp_path)))
    codec.mean = torch.tensor([0.1, -0.2, 0.0, 0.3])
    codec.std = torch.tensor([1.5, 0.5, 1.0, 2.0])
    den = _denoiser(REWARDS, in_channels=4, sample_size=16)
    pipe = MiroPipeline(denoiser=den, text_encoder=_encoder(), vae=codec)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.spec.latent == "vae" and pipe.resolution == 32
    before = pipe(CAPTIONS[:2], guidance_scale=0.5, num_inference_steps=STEPS, generator=_gen(9)).images
    assert before.shape == (2, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "pipe" / "vae" / "latent_stats.json").is_file()
    loaded = MiroPipeline.from_pretrained(str(tmp_path / "pipe"), device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, VAECodec)
    torch.testing.assert_close(loaded.vae.std, codec.std)
    after = loaded(CAPTIONS[:2], guidance_scale=0.5, num_inference_steps=STEPS, generator=_gen(9)).images
    np.testing.assert_array_equal(before, after)
