"""Latent codecs: pixel identity and a tiny random AutoencoderKL loaded through the real path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from miroflow.models.vae import LatentCodec, PixelCodec, VAECodec, create_codec


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    vae.save_pretrained(str(d))
    return d


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_pixel_codec_round_trip() -> None:
    codec = create_codec("pixel")
    assert isinstance(codec, PixelCodec) and isinstance(codec, LatentCodec)
    x = _images(2, 0)
    z = codec.encode(x)
    assert z.shape == x.shape and z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(codec.decode(z), x)
    assert codec.decode(torch.full_like(z, 5.0)).max() == 1.0
    with pytest.raises(ValueError, match="images"):
        codec.encode(torch.rand(2, 1, 32, 32))


def test_vae_shapes_round_trip(vae_dir: Path) -> None:
    codec = create_codec("vae", str(vae_dir), "cpu")
    assert isinstance(codec, VAECodec) and isinstance(codec, LatentCodec)
    assert (codec.channels, codec.downsample) == (4, 2)
    assert not any(p.requires_grad for p in codec.vae.parameters())
    x = _images(3, 1)
    z = codec.encode(x)
    assert z.shape == (3, 4, 16, 16)
    # Without fitted stats the config's scaling_factor is applied.
    torch.testing.assert_close(z, codec.encode_raw(x) * 0.5)
    y = codec.decode(z)
    assert y.shape == (3, 3, 32, 32) and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y, codec.decode_raw(codec.encode_raw(x)))
    assert torch.equal(codec.encode(x), z)  # posterior mean: deterministic


def test_vae_sampling_is_reproducible_with_generator(vae_dir: Path) -> None:
    codec = create_codec("vae", str(vae_dir), "cpu", sample=True)
    x = _images(2, 2)
    a = codec.encode(x, generator=torch.Generator().manual_seed(7))
    b = codec.encode(x, generator=torch.Generator().manual_seed(7))
    c = codec.encode(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_stats_normalise_and_round_trip(vae_dir: Path, tmp_path: Path) -> None:
    codec = VAECodec(str(vae_dir), "cpu")
    batches = [_images(4, s) for s in range(3)]
    raw = [codec.encode_raw(b) for b in batches]
    stats = codec.fit_stats(raw)
    assert len(stats["mean"]) == 4 and all(s > 0 for s in stats["std"])
    z = torch.cat([codec.encode(b) for b in batches])
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    path = codec.save_stats(tmp_path / "vae_stats.json")
    assert json.loads(path.read_text())["channels"] == 4
    reloaded = create_codec("vae", str(vae_dir), "cpu", stats_path=path)
    torch.testing.assert_close(reloaded.encode(batches[0]), codec.encode(batches[0]))
    torch.testing.assert_close(reloaded.decode(z[:2]), codec.decode_raw(raw[0][:2]), atol=1e-5, rtol=1e-4)


def test_codec_errors(tmp_path: Path, vae_dir: Path) -> None:
    with pytest.raises(ValueError, match="pixel, vae"):
        create_codec("latent")
    with pytest.raises(ValueError, match="vae_path"):
        create_codec("vae", None)
    missing = tmp_path / "no_vae"
    with pytest.raises(FileNotFoundError) as err:
        create_codec("vae", str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0.0], "std": [1.0]}))
    with pytest.raises(ValueError, match="4 floats"):
        VAECodec(str(vae_dir), stats_path=bad)
