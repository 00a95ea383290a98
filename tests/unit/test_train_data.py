"""Training data: conditioning follows the caption used, deterministic global order, embed sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from miroflow.conditioning import load_bins
from miroflow.config import Params, apply_overrides
from miroflow.data.score_tables import load_score_table
from miroflow.data.sidecars import embeds_manifest_path, read_sidecar, read_sidecar_header
from miroflow.data.train_data import GlobalBatchOrder, load_train_data, rank_slice, step_seed
from miroflow.embed import run_embed
from miroflow.models import create_text_encoder
from miroflow.prepare import run_prepare
from miroflow.score import run_bin, run_score
from miroflow.storage import Storage


def tiny_params(root: Path, *extra: str) -> Params:
    """Params for a 256-sample shapes dataset in two shards under ``root``."""
    return apply_overrides(
        Params(),
        [
            f"storage.root={root}/store",
            "data.num_samples=256",
            "data.shard_size=128",
            "data.synthetic_captions=true",
            f"data.manifest={root}/manifests/shards.json",
            f"score.manifest={root}/manifests/scores.json",
            f"score.bins={root}/manifests/bins.json",
            "score.num_bins=16",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Prepared, scored and binned tiny dataset (with synthetic captions)."""
    params = tiny_params(tmp_path_factory.mktemp("traindata"))
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return params


def test_global_order_is_world_size_independent_and_covers_epochs() -> None:
    order = GlobalBatchOrder(size=50, batch_size=8, seed=3)
    first = torch.cat([order.indices(s) for s in range(6)])  # 48 positions of epoch 0
    assert len(set(first.tolist())) == 48  # no repeats inside an epoch
    assert torch.equal(order.indices(4), GlobalBatchOrder(50, 8, 3).indices(4))  # pure function of step
    assert not torch.equal(order.indices(4), GlobalBatchOrder(50, 8, 4).indices(4))
    g = order.indices(7)  # spans epochs 1 and 2
    for world in (1, 2, 4):
        parts = [g[rank_slice(8, r, world)] for r in range(world)]
        assert torch.equal(torch.cat(parts), g)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        rank_slice(8, 0, 3)
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6) != step_seed(1, 5)


def test_rewards_follow_the_caption_used(scored: Params) -> None:
    storage = Storage()
    binset = load_bins(scored.score.bins)
    names = ["sharpness", "shapes_alignment"]
    data = load_train_data(scored.data.manifest, storage, names, binset, scored.score.manifest)
    assert len(data) == 256 and data.images is not None and data.images.dtype == torch.uint8
    assert tuple(data.images.shape) == (256, 32, 32, 3) and data.has_synthetic
    man = json.loads(Path(scored.score.manifest).read_text())
    df = load_score_table(man["tables"][0]["uri"], storage).set_index("key")
    i = data.keys.index(df.index[5])
    key = df.index[5]
    for j, name in enumerate(names):
        want = binset.transform_one(name, np.array([df.loc[key, name]]))[0]
        assert data.rewards[i, j].item() == pytest.approx(want)
    syn_align = binset.transform_one("shapes_alignment", np.array([df.loc[key, "shapes_alignment@synthetic"]]))[0]
    assert data.syn_rewards is not None and data.syn_rewards[i, 1].item() == pytest.approx(syn_align)
    assert data.syn_rewards[i, 0] == data.rewards[i, 0]  # image-only: same for both captions
    idx = torch.tensor([i, i])
    b = data.batch(idx, torch.tensor([False, True]))
    assert b.captions[0] == data.captions[i] and b.captions[1] == data.syn_captions[i]  # type: ignore[index]
    assert b.rewards[1, 1].item() == pytest.approx(syn_align) and b.rewards[0, 1].item() == pytest.approx(
        data.rewards[i, 1].item()
    )
    # Synthetic captions are accurate, originals are partly swapped: alignment is higher on synthetic ones.
    assert torch.nanmean(data.syn_rewards[:, 1]) > torch.nanmean(data.rewards[:, 1])


def test_missing_scores_are_nan_and_unknown_reward_named(scored: Params, tmp_path: Path) -> None:
    storage = Storage()
    binset = load_bins(scored.score.bins)
    man = json.loads(Path(scored.score.manifest).read_text())
    man["tables"] = man["tables"][:1]  # second shard unscored
    partial = tmp_path / "scores.json"
    partial.write_text(json.dumps(man))
    data = load_train_data(scored.data.manifest, storage, ["noise"], binset, partial)
    assert torch.isnan(data.rewards[128:]).all() and not torch.isnan(data.rewards[:128]).any()
    with pytest.raises(KeyError, match="'aesthetic'"):
        load_train_data(scored.data.manifest, storage, ["noise", "aesthetic"], binset, scored.score.manifest)


def test_embed_sidecars_match_in_memory_and_are_idempotent(scored: Params) -> None:
    storage = Storage()
    manifest = run_embed(scored)
    assert len(manifest["sidecars"]) == 2 and manifest["encoder"] == "minilm"
    uri = manifest["sidecars"][0]["uri"]
    tensors, meta = read_sidecar(uri, storage)
    assert tensors["tokens"].dtype == torch.float16 and tensors["tokens"].shape == (128, 32, 384)
    assert tensors["mask"].dtype == torch.bool and tensors["pooled"].shape == (128, 384)
    assert "syn_tokens" in tensors and len(json.loads(meta["keys"])) == 128
    path = storage.local_path(uri)
    assert path is not None
    mtime = path.stat().st_mtime_ns
    again = run_embed(scored)
    assert path.stat().st_mtime_ns == mtime and again["sidecars"] == manifest["sidecars"]
    assert read_sidecar_header(uri, storage)["encoder"] == "minilm"  # type: ignore[index]

    enc = create_text_encoder("minilm")
    from_side = load_train_data(
        scored.data.manifest, storage, [], text_spec="minilm", embeds_manifest=embeds_manifest_path(scored)
    )
    in_mem = load_train_data(scored.data.manifest, storage, [], text_encoder=enc)
    assert from_side.text is not None and in_mem.text is not None and from_side.syn_text is not None
    assert torch.equal(from_side.text.mask, in_mem.text.mask)
    assert torch.allclose(from_side.text.tokens.float(), in_mem.text.tokens.float(), atol=2e-3)
    assert torch.allclose(from_side.text.pooled, in_mem.text.pooled, atol=1e-5)
    # A sidecar for another encoder spec is not used.
    assert (
        load_train_data(
            scored.data.manifest, storage, [], text_spec="learned", embeds_manifest=embeds_manifest_path(scored)
        ).text
        is None
    )


def test_vae_latent_sidecars_and_stats(scored: Params, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    params = apply_overrides(
        scored, ["train.latent=vae", f"train.vae={tmp_path / 'vae'}", f"data.manifest={scored.data.manifest}"]
    )
    storage = Storage()
    manifest = run_embed(params)
    assert manifest["vae"] == str(tmp_path / "vae") and manifest["latent_stats_uri"]
    tensors, meta = read_sidecar(manifest["sidecars"][0]["uri"], storage)
    for name in ("latents_mean", "latents_std"):  # the VAE posterior, stored fp16
        assert tensors[name].dtype == torch.float16 and tensors[name].shape == (128, 4, 16, 16)
    stats = json.loads(storage.read_bytes(manifest["latent_stats_uri"]))
    data = load_train_data(
        params.data.manifest,
        storage,
        [],
        text_spec="minilm",
        embeds_manifest=embeds_manifest_path(params),
        latent="vae",
    )
    assert data.images is None and data.latents is not None and data.latents.shape == (256, 2, 4, 16, 16)
    z, post_std = data.latents[:, 0].double(), data.latents[:, 1].double()
    # stats of the sampled latents z = mean + std·eps: Var = Var[mean] + E[std²]
    var = z.var(dim=(0, 2, 3), unbiased=False) + (post_std**2).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(stats["mean"], z.mean(dim=(0, 2, 3)).numpy(), atol=2e-3)
    np.testing.assert_allclose(stats["std"], var.sqrt().numpy(), rtol=2e-2, atol=2e-3)
    assert data.batch(torch.tensor([3, 1])).x.shape == (2, 2, 4, 16, 16)


def test_sidecars_with_synthetic_captions_in_only_some_shards(tmp_path: Path) -> None:
    """Used to be an IndexError: shard b's sidecar has no syn_* (none of its samples has a synthetic
    caption), so its rows repeat its original text; a stale sidecar is an error naming the shard."""
    from miroflow.data.sidecars import sidecar_bytes
    from miroflow.data.train_data import _load_sidecar_text

    storage = Storage()
    g = torch.Generator().manual_seed(0)

    def arrays(n: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.randn(n, 4, 8, generator=g).half(),
            "mask": torch.ones(n, 4, dtype=torch.bool),
            "pooled": torch.randn(n, 8, generator=g),
        }

    a, b = arrays(3), arrays(2)
    a_syn = {f"syn_{k}": v for k, v in arrays(3).items()}
    keys_a, keys_b = ["a0", "a1", "a2"], ["b0", "b1"]
    for name, tensors, keys in (("shard-a", {**a, **a_syn}, keys_a), ("shard-b", b, keys_b)):
        (tmp_path / f"{name}.safetensors").write_bytes(
            sidecar_bytes(tensors, {"keys": json.dumps(keys), "encoder": "enc"})
        )
    man = tmp_path / "embeds.json"
    man.write_text(
        json.dumps(
            {
                "encoder": "enc",
                "sidecars": [{"shard": s, "uri": str(tmp_path / f"{s}.safetensors")} for s in ("shard-a", "shard-b")],
            }
        )
    )
    shards = [{"uri": "shard-a"}, {"uri": "shard-b"}]
    order = ["b1", "a0", "a2", "b0", "a1"]
    side = _load_sidecar_text(man, "enc", shards, order, storage, frozenset(keys_a))
    assert side is not None
    text, syn = side[0], side[1]
    assert syn is not None and syn.tokens.shape == (5, 4, 8) == text.tokens.shape
    assert torch.equal(syn.tokens[0], b["tokens"][1]) and torch.equal(syn.pooled[3], b["pooled"][0])
    assert torch.equal(syn.tokens[1], a_syn["syn_tokens"][0]) and torch.equal(text.tokens[1], a["tokens"][0])
    # A sample of shard b with a synthetic caption but no syn_* in its sidecar: stale, named.
    with pytest.raises(ValueError, match=r"embedding sidecar of shard shard-b .* has no synthetic-caption embeddings"):
        _load_sidecar_text(man, "enc", shards, order, storage, frozenset(keys_a + ["b0"]))
