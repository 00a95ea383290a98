"""VAE latents, trained (issue 11 item 4): ``train.latent: vae`` runs prepare -> score -> bin -> embed
-> train -> evaluate through the stage entry points with a tiny random-weight ``AutoencoderKL``.

See docs/architecture.md, "Text-embedding sidecars": the embed stage stores the VAE posterior's
``latents_mean`` / ``latents_std`` fp16 per sample and the channel stats of the sampled latents;
training draws ``z = mean + std·ε`` each step with ``ε`` a pure function of ``(train.seed, step)``
for the whole global batch (sliced per rank), normalises by the channel stats, and records them in
the checkpoint's ``miro.json``; evaluation decodes through the same VAE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from miroflow import stages
from miroflow.config import Params, load_params
from miroflow.data.sidecars import embeds_manifest_path, posterior_latents, read_sidecar, sidecar_bytes
from miroflow.data.train_data import load_train_data, step_seed
from miroflow.models.vae import VAECodec
from miroflow.pipeline import load_pipeline
from miroflow.preflight import PreflightError
from miroflow.storage import Storage
from miroflow.train import build_train_state
from miroflow.train_step import POSTERIOR_STREAM, make_batch, posterior_eps, to_model_space

RES = 32
N, SHARD, B = 32, 8, 8  # 4 shards of 8
REWARDS = "[sharpness,noise]"
DOWN = 2  # the tiny VAE's downsample (two encoder blocks)
C = 4  # its latent channels


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight AutoencoderKL saved with ``save_pretrained`` (4 channels, downsample 2)."""
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("tiny_vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=C,
        norm_num_groups=4,
        sample_size=RES,
    )
    vae.save_pretrained(str(d))
    return d


def _overrides(root: Path, vae: Path, *extra: str) -> list[str]:
    m = root / "manifests"
    return [
        f"storage.root={root / 'store'}",
        f"data.num_samples={N}",
        f"data.shard_size={SHARD}",
        f"data.resolution={RES}",
        f"data.manifest={m / 'shards.json'}",
        f"score.manifest={m / 'scores.json'}",
        f"score.bins={m / 'bins.json'}",
        f"score.rewards={REWARDS}",
        "score.num_bins=4",
        "score.device=cpu",
        "train.latent=vae",
        f"train.vae={vae}",
        "train.run_name=vae",
        "train.model=tiny",
        "train.device=cpu",
        "train.steps=20",
        f"train.batch_size={B}",
        "train.warmup_steps=2",
        "train.log_every=5",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "train.sample_steps=2",
        "train.sample_prompts=[a red circle]",
        "train.seed=3",
        "tracking.enabled=false",
        "eval.num_prompts=2",
        "eval.images_per_prompt=2",
        "eval.steps=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, vae_dir: Path) -> list[str]:
    """prepare -> score -> bin -> embed (VAE latents) once; the overrides of that data."""
    root = tmp_path_factory.mktemp("vae_e2e")
    ov = _overrides(root, vae_dir)
    params = load_params(None, ov)
    assert stages.check_params(params) == []
    assert stages.prepare(params).num_samples == N
    assert stages.score(params).num_rows == N
    assert stages.bin_scores(params).num_bins == 4
    assert stages.embed(params).sidecars == N // SHARD
    return ov


def _params(data: list[str], *extra: str) -> Params:
    return load_params(None, [*data, *extra])


def test_vae_latents_train_and_evaluate_end_to_end(data: list[str], vae_dir: Path) -> None:
    params = _params(data)
    storage = Storage(retries=0)
    # embed: every sidecar holds the posterior's mean and std, fp16 [n, C, RES/DOWN, RES/DOWN]
    man = json.loads(embeds_manifest_path(params).read_text())
    assert man["latent"] == "vae" and man["vae"] == str(vae_dir) and len(man["sidecars"]) == N // SHARD
    for entry in man["sidecars"]:
        tensors, meta = read_sidecar(entry["uri"], storage)
        assert "latents" not in tensors and meta["posterior"] == "mean+std"
        for name in ("latents_mean", "latents_std"):
            t = tensors[name]
            assert t.dtype == torch.float16 and tuple(t.shape) == (SHARD, C, RES // DOWN, RES // DOWN), name
            assert torch.isfinite(t).all()
        assert (tensors["latents_std"] > 0).all()
    stats = json.loads(storage.read_bytes(man["latent_stats_uri"]))
    assert stats["channels"] == C and stats["vae"] == str(vae_dir) and stats["of"] == "posterior samples"
    # the stats are those of the sampled latents: E[z] = E[mean], Var[z] = Var[mean] + E[std²]
    post = torch.cat([posterior_latents(read_sidecar(e["uri"], storage)[0]) for e in man["sidecars"]]).double()
    mean, std = post[:, 0], post[:, 1]
    var = mean.var(dim=(0, 2, 3), unbiased=False) + (std**2).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(stats["mean"], mean.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std"], var.sqrt().numpy(), rtol=1e-6)

    # train (in memory): finite loss, the checkpoint records the channel stats and the VAE
    tr = stages.train(params)
    assert tr.steps == 20 and tr.loss is not None and math.isfinite(tr.loss) and tr.kind == "miro"
    miro = json.loads((Path(tr.checkpoint) / "miro.json").read_text())
    assert miro["latent"] == "vae" and miro["vae"] == str(vae_dir)
    assert miro["latent_stats"]["mean"] == stats["mean"] and miro["latent_stats"]["std"] == stats["std"]
    assert miro["latent_stats"]["channels"] == C and miro["latent_stats"]["vae"] == str(vae_dir)
    assert miro["denoiser"]["in_channels"] == C and miro["denoiser"]["sample_size"] == RES // DOWN

    # the loaded pipeline decodes through the same VAE with those stats
    pipe = load_pipeline(tr.checkpoint, device="cpu")
    codec = pipe.vae
    assert isinstance(codec, VAECodec) and codec.path == str(vae_dir) and codec.downsample == DOWN
    assert codec.mean.tolist() == pytest.approx(stats["mean"]) and codec.std.tolist() == pytest.approx(stats["std"])

    # evaluate: images decoded at RES px, reward metrics present
    ev = stages.evaluate(params)
    assert ev.n_prompts == 2 and ev.n_images == 4
    assert set(ev.rewards) >= {"sharpness", "noise"}
    for name, stat in ev.rewards.items():
        assert stat.n == 4 and stat.mean is not None and math.isfinite(stat.mean), (name, stat)
    assert ev.model["latent"] == "vae"
    samples = sorted(Path(ev.output).glob("*/samples/*.png"))
    assert len(samples) == 4
    with Image.open(samples[0]) as img:  # decoded by the VAE: 3 channels at RES px
        assert img.mode == "RGB" and img.size == (RES, RES)


def test_posterior_eps_is_a_function_of_seed_and_step_and_is_sliced_per_rank(data: list[str]) -> None:
    params = _params(data, "train.run_name=eps")
    shape = (C, RES // DOWN, RES // DOWN)
    # the same (seed, step) draws the same eps; another step or seed another one
    a, b = posterior_eps(3, 7, B, shape), posterior_eps(3, 7, B, shape)
    assert torch.equal(a, b) and a.shape == (B, *shape)
    assert not torch.equal(a, posterior_eps(3, 8, B, shape)) and not torch.equal(a, posterior_eps(4, 7, B, shape))
    want = torch.randn((B, *shape), generator=torch.Generator().manual_seed(step_seed(3, 7, POSTERIOR_STREAM)))
    assert torch.equal(a, want)
    # its stream is new: the existing per-step streams 0..4 (pixel runs) are untouched
    assert POSTERIOR_STREAM not in range(5)

    state = build_train_state(params)
    assert tuple(state.shape) == shape
    x0 = make_batch(state, step=7).x0
    assert torch.equal(x0, make_batch(state, step=7).x0)  # deterministic
    # x0 = ((mean + std·eps) - mean_c) / std_c with eps of step 7, this rank's rows
    rows = state.source.batch(7, state.rows).x
    assert rows.dtype == torch.float16 and rows.shape == (B, 2, *shape)
    m_c, s_c = state.codec.mean.view(1, -1, 1, 1), state.codec.std.view(1, -1, 1, 1)
    z = rows[:, 0].float() + rows[:, 1].float() * a[state.rows]
    torch.testing.assert_close(x0, (z - m_c) / s_c)
    assert not torch.allclose(x0, to_model_space(rows, state.codec, state.device))  # sampled, not the mean
    # rank 1 of 2 gets rows [B/2, B) of the same global draw
    half = dataclasses.replace(state, rows=slice(B // 2, B))
    torch.testing.assert_close(make_batch(half, step=7).x0, x0[B // 2 :])
    state.source.close()


def test_streaming_path_trains_on_vae_latents(data: list[str]) -> None:
    params = _params(
        data, "train.run_name=vae-stream", "train.data=stream", "train.stream_partitions=2", "train.steps=6"
    )
    state = build_train_state(params)
    try:
        assert len(state.source) == N and type(state.source).__name__ == "StreamSource"
        batch = state.source.batch(2, state.rows)
        assert batch.x.dtype == torch.float16 and batch.x.shape == (B, 2, C, RES // DOWN, RES // DOWN)
        assert (batch.x[:, 1] > 0).all()  # the std travels with the stream
        eps = posterior_eps(params.train.seed, 2, B, state.shape)[state.rows]
        torch.testing.assert_close(
            make_batch(state, step=2).x0, to_model_space(batch.x, state.codec, state.device, eps)
        )
    finally:
        state.source.close()
    tr = stages.train(params)
    assert tr.steps == 6 and tr.loss is not None and math.isfinite(tr.loss)
    assert json.loads((Path(tr.checkpoint) / "miro.json").read_text())["latent_stats"]["channels"] == C


def test_old_sidecars_with_only_latents_train_as_a_deterministic_posterior(data: list[str], tmp_path: Path) -> None:
    params = _params(data)
    storage = Storage(retries=0)
    man = json.loads(embeds_manifest_path(params).read_text())
    for e in man["sidecars"]:  # rewrite each sidecar in the older layout: `latents` = the mean alone
        tensors, meta = read_sidecar(e["uri"], storage)
        old = {k: v for k, v in tensors.items() if k not in ("latents_mean", "latents_std")}
        old["latents"] = tensors["latents_mean"]
        meta.pop("posterior")
        e["uri"] = str(tmp_path / Path(e["uri"]).name)
        Path(e["uri"]).write_bytes(sidecar_bytes(old, meta))
    (tmp_path / "m").mkdir()
    shutil.copy(params.data.manifest, tmp_path / "m" / "shards.json")  # same shards, the old sidecars
    (tmp_path / "m" / "embeds.json").write_text(json.dumps(man))
    legacy = _params(data, f"data.manifest={tmp_path / 'm' / 'shards.json'}", "train.run_name=legacy", "train.steps=3")
    new = load_train_data(
        params.data.manifest,
        storage,
        [],
        text_spec="minilm",
        embeds_manifest=embeds_manifest_path(params),
        latent="vae",
    )
    d = load_train_data(
        legacy.data.manifest,
        storage,
        [],
        text_spec="minilm",
        embeds_manifest=embeds_manifest_path(legacy),
        latent="vae",
    )
    assert d.latents is not None and new.latents is not None and d.latents.shape == (N, 2, C, RES // DOWN, RES // DOWN)
    assert torch.equal(d.latents[:, 0], new.latents[:, 0]) and not d.latents[:, 1].any()
    codec = VAECodec.__new__(VAECodec)  # stats only: to_model_space needs nothing else
    codec.mean, codec.std = torch.zeros(C), torch.ones(C)
    eps = torch.randn(N, C, RES // DOWN, RES // DOWN)
    x = to_model_space(d.latents, codec, torch.device("cpu"), eps)
    assert torch.equal(x, d.latents[:, 0].float())  # std 0: the sample is the mean whatever eps
    tr = stages.train(legacy)  # and old data still trains
    assert tr.steps == 3 and tr.loss is not None and math.isfinite(tr.loss)


def test_vae_training_without_the_embed_stage_is_one_line_naming_the_fix(data: list[str], tmp_path: Path) -> None:
    src = _params(data)
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(src.data.manifest, m / "shards.json")  # the same shards, scores and bins; no embeds.json
    params = _params(data, f"data.manifest={m / 'shards.json'}", "train.run_name=no-embed")
    with pytest.raises(PreflightError) as err:
        stages.train(params)
    msg = str(err.value)
    assert "\n" not in msg and "train.latent" in msg and "run the embed stage with train.latent=vae" in msg, msg
    # embedded for pixel training (no latents): the same fix
    (m / "embeds.json").write_text(json.dumps({"encoder": "minilm", "latent": "pixel", "latent_stats_uri": None}))
    with pytest.raises(PreflightError, match=r"holds no VAE latents .*run the embed stage"):
        stages.train(params)
    # latents of another VAE
    with pytest.raises(PreflightError, match=r"train.vae: .*encoded with VAE .*run the embed stage"):
        stages.train(_params(data, "train.vae=/elsewhere/vae"))
