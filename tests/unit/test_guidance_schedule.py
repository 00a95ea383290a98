"""Guidance schedules of ``MiroPipeline`` (constant / interval / damped) on a tiny random MIRO model (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from miroflow.config import Params, ParamsError, apply_overrides
from miroflow.evaluate import generate
from miroflow.flow import cfg_model_fn, euler_sample, guided_velocity
from miroflow.models import LearnedTokenEncoder, PixelCodec, create_denoiser
from miroflow.pipeline import MiroPipeline, check_guidance_schedule, guidance_weight

REWARDS = ["sharpness", "contrast", "shapes_alignment"]
CAPTIONS = ["a red circle", "two blue squares", "three red squares"]
DIM = 32
STEPS = 4  # flow times 1, 0.75, 0.5, 0.25


def _pipe() -> MiroPipeline:
    torch.manual_seed(0)
    den = create_denoiser("tiny", REWARDS, text_dim=DIM, pooled_dim=DIM, num_layers=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # leave the zero init so v depends on the reward targets
        for p in den.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    enc = LearnedTokenEncoder.from_captions(CAPTIONS, dim=DIM, num_layers=1, num_heads=2, max_length=12)
    pipe = MiroPipeline(denoiser=den.eval(), text_encoder=enc.eval(), vae=PixelCodec())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> MiroPipeline:
    return _pipe()


def _sample(pipe: MiroPipeline, omega: float, **kw: object) -> torch.Tensor:
    out = pipe(
        CAPTIONS[:2],
        guidance_scale=omega,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        **kw,  # type: ignore[arg-type]
    )
    return out.images  # type: ignore[union-attr]


def test_constant_default_is_todays_sampler(pipe: MiroPipeline) -> None:
    """The default equals the pre-schedule sampler (cfg_model_fn + euler_sample) bit for bit."""
    prompts = CAPTIONS[:2]
    emb = pipe.encode_prompt(prompts)
    cond = {"text_tokens": emb.tokens, "text_mask": emb.mask, "pooled": emb.pooled}
    pos, neg = dict(cond), dict(cond)
    pos["rewards"] = pipe._reward_tensor(pipe.resolve_reward_targets(None, 1.0), 2)
    neg["rewards"] = pipe._reward_tensor(pipe.resolve_reward_targets(None, 0.0), 2)
    x_init = pipe.prepare_latents(2, torch.Generator().manual_seed(3))
    x0 = euler_sample(cfg_model_fn(pipe._velocity, pos, neg, 1.0), tuple(x_init.shape), steps=STEPS, x_init=x_init)
    ref = pipe.vae.decode(x0).float().clamp(0.0, 1.0).cpu()
    assert torch.equal(_sample(pipe, 1.0), ref)
    assert torch.equal(_sample(pipe, 1.0, guidance_schedule="constant", guidance_interval=[0.2, 0.4]), ref)


def test_interval_extremes(pipe: MiroPipeline) -> None:
    """Interval [0, 1] = constant and an interval holding no step time = ω 0, bit for bit; damped differs."""
    const, plain = _sample(pipe, 1.0), _sample(pipe, 0.0)
    assert not torch.equal(const, plain)  # guidance matters for this model, so the test can fail
    assert torch.equal(_sample(pipe, 1.0, guidance_schedule="interval", guidance_interval=[0.0, 1.0]), const)
    assert torch.equal(_sample(pipe, 1.0, guidance_schedule="interval", guidance_interval=[0.0, 0.1]), plain)
    damped = _sample(pipe, 1.0, guidance_schedule="damped")
    assert not torch.equal(damped, const) and not torch.equal(damped, plain)


def test_interval_skips_negative_forward(pipe: MiroPipeline) -> None:
    """Outside the interval only the positive branch runs: rows per step are B there, 2B inside."""
    rows: list[int] = []
    hook = pipe.denoiser.register_forward_hook(lambda _m, args, _out: rows.append(int(args[0].shape[0])))
    try:
        _sample(pipe, 1.0, guidance_schedule="interval", guidance_interval=[0.4, 0.6])
    finally:
        hook.remove()
    assert rows == [2, 2, 4, 2]  # t = 1, 0.75 outside; 0.5 inside; 0.25 outside


def test_damped_matches_written_formula(pipe: MiroPipeline) -> None:
    """Damped cosine = v⁺ + ω·(1 − cos πt)/2·(v⁺ − v⁻) with separate forwards per branch."""
    emb = pipe.encode_prompt(CAPTIONS[:2])
    pos = pipe._reward_tensor(pipe.resolve_reward_targets(None, 1.0), 2)
    neg = pipe._reward_tensor(pipe.resolve_reward_targets(None, 0.0), 2)
    x_init = pipe.prepare_latents(2, torch.Generator().manual_seed(3))
    omega = 2.0

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        vp = pipe.denoiser(x, t, emb.tokens, emb.mask, emb.pooled, pos)
        vn = pipe.denoiser(x, t, emb.tokens, emb.mask, emb.pooled, neg)
        w = omega * 0.5 * (1 - math.cos(math.pi * float(t[0])))
        return guided_velocity(vp, vn, w)

    ref = pipe.vae.decode(euler_sample(v, tuple(x_init.shape), steps=STEPS, x_init=x_init)).clamp(0, 1)
    got = _sample(pipe, omega, guidance_schedule="damped", guidance_decay="cosine")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_guidance_weight_values() -> None:
    assert guidance_weight(2.0, 0.3) == 2.0
    assert guidance_weight(2.0, 0.3, "interval", (0.25, 0.75)) == 2.0
    assert guidance_weight(2.0, 0.8, "interval", (0.25, 0.75)) == 0.0
    assert guidance_weight(2.0, 1.0, "damped") == 2.0  # full ω at the noise end
    assert guidance_weight(2.0, 0.25, "damped") == pytest.approx(0.5)
    assert guidance_weight(2.0, 0.0, "damped", decay="cosine") == pytest.approx(0.0)
    assert guidance_weight(2.0, 0.5, "damped", decay="cosine") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"guidance_interval": [0.6, 0.2]}, "guidance_interval"),
        ({"guidance_interval": [-0.1, 0.5]}, "guidance_interval"),
        ({"guidance_interval": [0.0, 1.5]}, "guidance_interval"),
        ({"guidance_interval": [0.5]}, "guidance_interval"),
        ({"guidance_interval": [0.2, float("nan")]}, "guidance_interval"),
        ({"guidance_schedule": "cosine"}, "guidance_schedule"),
        ({"guidance_decay": "exp"}, "guidance_decay"),
    ],
)
def test_bad_schedule_rejected_by_pipeline(pipe: MiroPipeline, kw: dict[str, object], field: str) -> None:
    args = {"guidance_schedule": "interval", **kw}
    with pytest.raises(ValueError, match=field):
        _sample(pipe, 1.0, **args)
    with pytest.raises(ValueError, match=field):
        check_guidance_schedule(
            str(args["guidance_schedule"]),
            args.get("guidance_interval"),  # type: ignore[arg-type]
            str(args.get("guidance_decay", "linear")),
        )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("eval.guidance_interval=[0.7,0.3]", "eval.guidance_interval"),
        ("eval.guidance_interval=[0.0,2.0]", "eval.guidance_interval"),
        ("eval.guidance_schedule=sometimes", "eval.guidance_schedule"),
        ("eval.guidance_decay=exp", "eval.guidance_decay"),
    ],
)
def test_bad_params_rejected_naming_field(override: str, field: str) -> None:
    with pytest.raises(ParamsError, match=field.replace(".", r"\.")):
        apply_overrides(Params(), [override])


def test_params_and_generate_plumbing(pipe: MiroPipeline) -> None:
    """eval.* schedule keys parse, and ``evaluate.generate`` hands them to the pipeline."""
    p = apply_overrides(
        Params(), ["eval.guidance_schedule=interval", "eval.guidance_interval=[0.0,0.1]", "eval.guidance_decay=cosine"]
    )
    ev = p.eval
    assert (ev.guidance_schedule, ev.guidance_interval, ev.guidance_decay) == ("interval", (0.0, 0.1), "cosine")
    assert Params().eval.guidance_schedule == "constant"
    kw = {"num_inference_steps": STEPS, "batch_size": 2}
    off = generate(pipe, CAPTIONS[:2], [5, 6], guidance_scale=0.0, **kw)  # type: ignore[arg-type]
    const = generate(pipe, CAPTIONS[:2], [5, 6], guidance_scale=1.0, **kw)  # type: ignore[arg-type]
    sched = generate(
        pipe,
        CAPTIONS[:2],
        [5, 6],
        guidance_scale=1.0,
        guidance_schedule=ev.guidance_schedule,
        guidance_interval=ev.guidance_interval,
        guidance_decay=ev.guidance_decay,
        **kw,  # type: ignore[arg-type]
    )
    assert not np.array_equal(off, const)
    assert np.array_equal(sched, off)


# --------------------------------------------------------------------------- the study's schedule question
def _pt(name: str, omega: float, schedule: str, acc: float, se: float, r: float) -> dict[str, object]:
    return {"name": name, "omega": omega, "schedule": schedule, "overall": acc, "judge_se": se, "a": r, "b": r}


def test_schedule_verdict_yes_and_no() -> None:
    from miroflow.study.report import schedule_verdict

    ref = _pt("omega0", 0.0, "constant", 0.45, 0.02, 0.50)
    full = _pt("constant", 1.0, "constant", 0.39, 0.02, 0.70)  # gain 0.20, accuracy −0.06 (> 2 SE = 0.057)
    keeps = _pt("interval", 1.0, "interval", 0.44, 0.02, 0.69)  # keeps 95 %, accuracy −0.01
    weak = _pt("damped", 1.0, "damped", 0.45, 0.02, 0.60)  # keeps 50 %
    v = schedule_verdict({"points": [ref, full, keeps, weak]}, ["a", "b"])
    assert v["answer"] == "yes" and "**Yes**: interval." in v["sentence"]
    rows = {r["name"]: r for r in v["rows"]}
    assert rows["interval"]["kept"] == pytest.approx(0.95) and rows["damped"]["kept"] == pytest.approx(0.5)
    assert not rows["constant"]["acc_ok"] and rows["constant"]["kept"] == pytest.approx(1.0)
    # the judge's own score is not part of the reward gain (the accuracy condition covers alignment)
    with_judge = [{**p, "shapes_alignment": 1.0 - float(p["a"])} for p in (ref, full, keeps)]  # type: ignore[arg-type]
    rows_j = schedule_verdict({"points": with_judge}, ["a", "b", "shapes_alignment"])["rows"]
    assert [r["kept"] for r in rows_j] == pytest.approx([1.0, 0.95])
    v = schedule_verdict({"points": [ref, full, weak]}, ["a", "b"])
    assert v["answer"] == "no" and "**No**" in v["sentence"]
    # no reference point, or no gain at all: the question does not apply (said so, no crash)
    assert schedule_verdict({"points": [full, keeps]}, ["a", "b"])["answer"] == "n/a"
    flat = _pt("constant", 1.0, "constant", 0.45, 0.02, 0.50)
    assert schedule_verdict({"points": [ref, flat, keeps]}, ["a", "b"])["answer"] == "n/a"


def test_floor_text_and_hacking_lines() -> None:
    from miroflow.study.report import floor_text, hacking_lines

    assert (
        floor_text({"judge_floor": {"error": "ImportError: gone", "max": {}}})
        == "Judge floor: n/a (ImportError: gone)."
    )
    assert floor_text({}).startswith("Judge floor: n/a")
    fl = {"kinds": {"blank": {"single_object": 0.0, "overall": 0.0}}, "max": {"single_object": 0.0, "overall": 0.0}}
    assert "overall **0.000**" in floor_text({"judge_floor": {**fl, "error": None, "resolution": 32}})
    flag = {"rose": "sharpness", "fell": "judge_accuracy", "rise": 0.2, "rise_se": 0.01, "fall": -0.1}
    flag |= {"fall_se": 0.02, "start": "ω 0", "end": "ω 1"}
    study = {
        "hacking": {"curves": {"miro-s0": {"flags": [], "error": None}}, "sweeps": {"guidance": {"flags": [flag]}}}
    }
    lines = hacking_lines(study)
    assert len(lines) == 1 and "sharpness rose +0.200" in lines[0] and "judge_accuracy fell -0.100" in lines[0]
    assert hacking_lines({"hacking": {"curves": {"x": {"flags": [], "error": None}}, "sweeps": {}}}) == []


def test_study_rejects_bad_schedule_interval(tmp_path: object) -> None:
    from pathlib import Path

    from miroflow.study import load_study_config

    bad = Path(str(tmp_path)) / "study.yaml"
    bad.write_text(
        "study:\n  guidance_schedules:\n    - {name: a, guidance_scale: 1.0, schedule: interval, interval: [0.8, 0.2]}\n"
    )
    with pytest.raises(ParamsError, match=r"study\.guidance_schedules\.0\.interval"):
        load_study_config(bad)
