"""bf16 autocast on CPU and torch.compile (inductor on CPU) at tiny size, through the library's own switches.

``train.mixed_precision`` and ``train.compile`` reach the step through
:func:`~miroflow.train_state.create_train_state`; sampling is :class:`~miroflow.pipeline.MiroPipeline`
with its denoiser compiled in place (``pipe.denoiser.compile()``: the pipeline has no switch of its own).

Tolerances (the values measured on this CPU are in the comments of each test):

* bf16 vs fp32 loss, relative 2e-3. Autocast runs every matmul/attention in bf16 (unit roundoff
  2⁻⁸ ≈ 0.4 %) with fp32 accumulation, so the velocity ``v`` carries ≈ 0.4 % relative error; the
  loss ``mean((v − u)²)`` against the fp32 target ``u`` moves by at most ``2·0.004·|v|/|v − u|``
  ≈ 2e-3 here (``|v|`` ≈ 0.3 ``|v − u|``) if every rounding error pointed the same way, and by
  far less when they average over the 24k elements of a batch (measured 1e-5 to 5e-5). A bf16
  loss, or inputs cast to bf16 before the loss, is outside it; that autocast really ran is checked
  on the output dtype and on the losses not being bit-identical.
* compiled vs eager: loss relative 1e-6 (inductor fuses and reorders fp32 reductions: measured
  8e-8), parameters after three AdamW steps absolute 1e-4 = a tenth of one step at lr 1e-3 (Adam
  divides by the gradient's RMS, so a tiny gradient's rounding difference can become a visible
  update; measured 8e-6); sampled images absolute 1e-5 in [0, 1] (measured 4e-7).
* ``train.compile`` compiles the denoiser of the train step in place; its cold compile (forward and
  backward: 80-160 s on 2 loaded cores) puts that test in the slow suite (``make test-all``), and so
  does the compiled sampling run (forward only, but 35-47 s cold: inductor's fixed cost of ≈ 30 s is
  not "well under a minute" on a loaded machine). The bf16 tests and the bad-input case are fast.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from miroflow.config import Params, ParamsError, apply_overrides
from miroflow.data.train_data import TextArrays, TrainData
from miroflow.models import PixelCodec, TextEmbedding, create_denoiser
from miroflow.train_state import DistContext, TrainInputs, TrainState, create_train_state, precision_context
from miroflow.train_step import make_batch, train_step
from tests.tiny_models import tiny_random_pipeline

N, L, D = 16, 8, 16
REWARDS = ["sharpness", "noise"]
STEPS = 3
BF16_RTOL = 2e-3
COMPILE_LOSS_RTOL = 1e-6
COMPILE_PARAM_ATOL = 1e-4
SAMPLE_ATOL = 1e-5


class ZeroEncoder:
    """Frozen-encoder stand-in: every caption (the empty one for text dropout) is one real zero token."""

    name, dim, pooled_dim, max_length = "zero", D, D, L

    def encode(self, prompts: list[str]) -> TextEmbedding:
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        mask[:, 0] = True
        return TextEmbedding(torch.zeros(len(prompts), L, D), mask, torch.zeros(len(prompts), D))


def _data() -> TrainData:
    """16 pixel samples (uint8 32×32), two rewards, precomputed text of random length."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (N,), generator=g)[:, None]
    text = TextArrays(
        (torch.randn(N, L, D, generator=g) * mask[..., None]).half(), mask, torch.randn(N, D, generator=g)
    )
    return TrainData(
        keys=[str(i) for i in range(N)],
        images=torch.randint(0, 256, (N, 32, 32, 3), generator=g, dtype=torch.uint8),
        latents=None,
        captions=[f"caption {i}" for i in range(N)],
        syn_captions=None,
        reward_names=list(REWARDS),
        rewards=torch.rand(N, len(REWARDS), generator=g),
        syn_rewards=None,
        text=text,
    )


def build(tmp_path: Path, *overrides: str) -> TrainState:
    """A tiny in-memory CPU state whose denoiser does not start at v = 0 (weights perturbed, seeded)."""
    params = apply_overrides(
        Params(),
        [
            f"storage.root={tmp_path}",
            "train.model=tiny",
            "train.batch_size=8",
            "train.steps=10",
            "train.warmup_steps=1",
            "train.seed=3",
            "train.text_dropout=0.25",
            "train.device=cpu",
            *overrides,
        ],
    )
    torch.manual_seed(params.train.seed)
    model = create_denoiser("tiny", REWARDS, text_dim=D, pooled_dim=D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a zero-init model outputs exactly 0 in any precision: make the forward matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = TrainInputs(_data(), PixelCodec(), model, list(REWARDS), {"run_name": "unit"}, frozen=ZeroEncoder())
    return create_train_state(params, inputs, DistContext())


def losses(state: TrainState, steps: int = STEPS) -> list[float]:
    """The losses of ``steps`` consecutive library steps."""
    return [train_step(state, make_batch(state)).loss for _ in range(steps)]


def test_bf16_autocast_on_cpu_matches_the_fp32_loss(tmp_path: Path) -> None:
    fp32, bf16 = build(tmp_path, "train.mixed_precision='no'"), build(tmp_path, "train.mixed_precision=bf16")
    b = make_batch(bf16)
    assert b.text is not None
    with torch.no_grad(), bf16.autocast:  # the switch really runs the denoiser in bf16 on CPU
        out = bf16.net(b.x0, b.t, b.text.tokens, b.text.mask, b.text.pooled, b.rewards)
    assert out.dtype == torch.bfloat16
    l32, l16 = losses(fp32), losses(bf16)
    assert all(math.isfinite(v) for v in l16)
    for a, c in zip(l32, l16):  # measured: relative differences of 1e-5 to 5e-5
        assert abs(c - a) <= BF16_RTOL * abs(a), (l32, l16)
    assert l16 != l32, "bf16 gave bit-identical losses: autocast did not run"


def test_auto_precision_on_cpu_is_bit_identical_to_fp32(tmp_path: Path) -> None:
    auto, no = build(tmp_path, "train.mixed_precision=auto"), build(tmp_path, "train.mixed_precision='no'")
    assert losses(auto) == losses(no)  # the demo's and study's numbers depend on this


@pytest.mark.slow
def test_compiled_train_step_matches_eager(tmp_path: Path) -> None:
    eager, compiled = build(tmp_path), build(tmp_path, "train.compile=true")
    t0 = time.perf_counter()
    lc = losses(compiled)
    print(f"compiled {STEPS} steps (compile included) in {time.perf_counter() - t0:.1f} s")
    le = losses(eager)
    for a, c in zip(le, lc):  # measured: relative differences of 8e-8
        assert abs(c - a) <= COMPILE_LOSS_RTOL * abs(a), (le, lc)
    for (name, pe), pc in zip(eager.net.named_parameters(), compiled.net.parameters()):
        assert torch.allclose(pe, pc, rtol=0, atol=COMPILE_PARAM_ATOL), name  # measured: at most 8e-6
    # compiled in place: checkpoints keep the eager module's keys
    assert list(compiled.net.denoiser.state_dict()) == list(eager.net.denoiser.state_dict())


@pytest.mark.slow
def test_compiled_sampling_matches_eager() -> None:
    pipe = tiny_random_pipeline(REWARDS, "unit", 0, perturb=0.05)  # trained-like weight scale
    prompts = ["a red circle", "two blue squares"]

    def sample() -> torch.Tensor:
        out = pipe(
            prompts,
            guidance_scale=0.5,
            num_inference_steps=4,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return out.images  # type: ignore[no-any-return]

    eager = sample()
    pipe.denoiser.compile()
    compiled = sample()
    assert compiled.shape == eager.shape == (4, 3, 32, 32)
    assert not torch.equal(eager[0], eager[1])  # the images differ: a real sampling run
    assert torch.allclose(compiled, eager, rtol=0, atol=SAMPLE_ATOL), float((compiled - eager).abs().max())  # 4e-7


def test_bad_precision_values_are_rejected_naming_the_field() -> None:
    with pytest.raises(ParamsError) as err:
        apply_overrides(Params(), ["train.mixed_precision=fp16"])
    assert any(p.startswith("train.mixed_precision") for p in err.value.problems), err.value.problems
    with pytest.raises(ParamsError) as err2:
        apply_overrides(Params(), ["train.compile=sometimes"])
    assert any(p.startswith("train.compile") for p in err2.value.problems), err2.value.problems
    with pytest.raises(ValueError, match="train.mixed_precision"):
        precision_context(torch.device("cpu"), "fp8")  # a value that bypassed validation (model_construct)
