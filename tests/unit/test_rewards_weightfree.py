"""Weight-free rewards: monotone in their degradation, agreeing on clean images, fast enough."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from miroflow.rewards import available_rewards, create_reward
from miroflow.rewards.weightfree import luminance, median3x3, noise_sigma

NAMES = ["sharpness", "noise", "contrast", "compressibility"]
SIZE = 32


# ----------------------------------------------------------------------------- test images
def _scene(seed: int, size: int = SIZE) -> np.ndarray:
    """A light background with 2-3 saturated rectangles/discs; ``[H, W, 3]`` float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    bg = rng.uniform(0.85, 0.97)
    img = np.full((size, size, 3), bg, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    palette = np.array(
        [[0.85, 0.1, 0.1], [0.1, 0.25, 0.85], [0.1, 0.65, 0.15], [0.95, 0.8, 0.1], [0.5, 0.1, 0.6]],
        dtype=np.float32,
    )
    for k in range(int(rng.integers(2, 4))):
        colour = palette[(seed + k) % len(palette)]
        cx, cy = rng.integers(7, size - 7, size=2)
        r = int(rng.integers(4, 8))
        if k % 2 == 0:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r - 1)
        img[mask] = colour
    return img


def clean_batch(n: int, size: int = SIZE) -> torch.Tensor:
    """``n`` clean scenes as ``[n, 3, H, W]`` float32 in [0, 1]."""
    return torch.from_numpy(np.stack([_scene(s, size) for s in range(n)])).permute(0, 3, 1, 2).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of ``x [B, 3, H, W]``; sigma in pixels."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def add_noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Additive i.i.d. Gaussian noise of ``std`` (pixel scale [0, 1]), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def reduce_contrast(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Blend toward mid-grey: ``0.5 + (x − 0.5)·(1 − strength)``."""
    return 0.5 + (x - 0.5) * (1.0 - strength)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip every image through PIL JPEG at ``quality`` (default 4:2:0 chroma)."""
    out = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def degrade(x: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """Apply one degradation ``kind`` at ``level`` (blur σ, noise std, contrast strength, JPEG quality)."""
    if kind == "blur":
        return gaussian_blur(x, level)
    if kind == "noise":
        return add_noise(x, level)
    if kind == "contrast":
        return reduce_contrast(x, level)
    if kind == "jpeg":
        return jpeg(x, int(level))
    raise ValueError(kind)


LEVELS: dict[str, list[float]] = {
    "blur": [0.6, 1.0, 1.5, 2.5],
    "noise": [0.02, 0.05, 0.1, 0.2],
    "contrast": [0.2, 0.4, 0.6, 0.8],
    "jpeg": [50, 25, 10, 5],
}


@pytest.fixture(scope="module")
def rewards() -> dict[str, object]:
    return {n: create_reward(n) for n in NAMES}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return clean_batch(8)


# ----------------------------------------------------------------------------- registry / protocol
def test_registered_with_protocol(rewards: dict[str, object]) -> None:
    from miroflow.rewards import Reward

    assert set(NAMES) <= set(available_rewards())
    for name, r in rewards.items():
        assert isinstance(r, Reward)
        assert r.name == name and r.version.startswith(name + "-v")
        assert r.uses_prompt is False


def test_output_contract(rewards: dict[str, object], images: torch.Tensor) -> None:
    for name, r in rewards.items():
        raw = r.score(images, ["x"] * len(images))
        assert raw.shape == (len(images),) and raw.dtype == torch.float32 and raw.device.type == "cpu", name
        assert torch.isfinite(raw).all(), name
        norm = r.normalize(raw)
        assert norm.shape == raw.shape and (norm >= 0).all() and (norm <= 1).all(), name
        # Batch independence: scoring one image alone gives the same value.
        assert torch.allclose(r.score(images[:1], ["x"]), raw[:1], atol=1e-6), name


def test_weights_rejected() -> None:
    with pytest.raises(ValueError, match="score.reward_weights.sharpness"):
        create_reward("sharpness", weights="/some/file.pt")
    with pytest.raises(TypeError, match="bogus"):
        create_reward("noise", bogus=1)


def test_bad_shape_rejected(rewards: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rewards["sharpness"].score(torch.zeros(2, 32, 32), ["a", "b"])


# ----------------------------------------------------------------------------- building blocks
def test_median3x3_matches_numpy() -> None:
    x = torch.rand(2, 7, 9, generator=torch.Generator().manual_seed(1))
    got = median3x3(x)
    xp = np.pad(x.numpy(), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    want = np.empty_like(x.numpy())
    for i in range(7):
        for j in range(9):
            want[:, i, j] = np.median(xp[:, i : i + 3, j : j + 3].reshape(2, -1), axis=1)
    np.testing.assert_allclose(got.numpy(), want, atol=0)


def test_noise_sigma_calibrated_on_flat_image() -> None:
    g = torch.Generator().manual_seed(0)
    for std in [0.02, 0.05, 0.1]:
        y = 0.5 + std * torch.randn(4, 64, 64, generator=g)
        est = noise_sigma(y)
        assert torch.allclose(est, torch.full_like(est, std), rtol=0.08), (std, est)
    assert noise_sigma(luminance(clean_batch(4))).max() < 1e-6  # clean renders: no noise


# ----------------------------------------------------------------------------- monotonicity
def _mean_norm(r: object, x: torch.Tensor) -> float:
    return float(r.normalize(r.score(x, [""] * len(x))).mean())


def _mean_raw(r: object, x: torch.Tensor) -> float:
    return float(r.score(x, [""] * len(x)).mean())


def test_sharpness_decreases_with_blur(rewards: dict[str, object], images: torch.Tensor) -> None:
    vals = [_mean_raw(rewards["sharpness"], gaussian_blur(images, s)) for s in [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]]
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    # and per image, not just on average
    r = rewards["sharpness"]
    assert (r.score(images, []) > r.score(gaussian_blur(images, 1.0), [])).all()


def test_noise_reward_decreases_and_sharpness_not_inflated(rewards: dict[str, object], images: torch.Tensor) -> None:
    stds = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    noise_norm = [_mean_norm(rewards["noise"], add_noise(images, s)) for s in stds]
    assert all(a > b for a, b in zip(noise_norm, noise_norm[1:])), noise_norm
    sharp_raw = torch.stack([rewards["sharpness"].score(add_noise(images, s), []) for s in stds])  # [S, B]
    # Noise never raises sharpness, per image, at any level (small tolerance for ties at 0 noise).
    assert (sharp_raw[1:] <= sharp_raw[:1] + 1e-4).all(), sharp_raw.mean(dim=1)
    # Nor does it raise contrast.
    con_raw = torch.stack([rewards["contrast"].score(add_noise(images, s), []) for s in stds])
    assert (con_raw[1:] <= con_raw[:1] + 2e-3).all(), con_raw.mean(dim=1)


def test_contrast_decreases_toward_grey(rewards: dict[str, object], images: torch.Tensor) -> None:
    r = rewards["contrast"]
    per_img = torch.stack([r.score(reduce_contrast(images, s), []) for s in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]])
    assert (per_img[:-1] > per_img[1:]).all()
    assert per_img[-1].abs().max() < 1e-6  # uniform grey has no contrast
    # RMS contrast scales linearly with the blend factor on a noise-free image.
    torch.testing.assert_close(per_img[2], 0.6 * per_img[0], rtol=1e-3, atol=1e-4)


def test_compressibility_monotone_in_jpeg_quality(rewards: dict[str, object], images: torch.Tensor) -> None:
    r = rewards["compressibility"]
    qualities = [95, 50, 25, 10]
    vals = [_mean_norm(r, jpeg(images, q)) for q in qualities]
    clean = _mean_norm(r, images)
    assert clean > vals[0], (clean, vals)
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    # noise also makes an image less compressible relative to its structure
    assert _mean_norm(r, add_noise(images, 0.05)) < clean


# ----------------------------------------------------------------------------- agreement on clean images
@pytest.mark.parametrize("name", NAMES)
def test_clean_image_near_top_of_every_reward(rewards: dict[str, object], images: torch.Tensor, name: str) -> None:
    """A clean render scores ≥ the 75th percentile of its degraded variants, for every reward."""
    r = rewards[name]
    variants = torch.cat([degrade(images, kind, lvl) for kind, lvls in LEVELS.items() for lvl in lvls])  # [K*B, ...]
    n = len(images)
    clean = r.normalize(r.score(images, []))  # [B]
    deg = r.normalize(r.score(variants, [])).view(-1, n)  # [K, B]
    q75 = torch.quantile(deg, 0.75, dim=0)
    assert (clean >= q75 - 1e-6).all(), (name, clean, q75)


# ----------------------------------------------------------------------------- real shapes renders
def _u8_to_tensor(arrs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def test_with_shapes_renders_and_degradations(rewards: dict[str, object]) -> None:
    """The same properties on real ``miroflow.data.shapes`` renders (anti-aliased, uint8)."""
    shapes = pytest.importorskip("miroflow.data.shapes")
    if not hasattr(shapes, "apply_degradation"):
        pytest.skip("miroflow.data.shapes has no apply_degradation yet")
    rng = np.random.default_rng(0)
    clean_u8 = [shapes.render(shapes.sample_scene(rng), SIZE) for _ in range(8)]
    levels = {  # shapes' contrast is a factor (1 = unchanged), JPEG a quality
        "blur": [0.6, 1.0, 1.5, 2.0],
        "noise": [0.05, 0.1, 0.15, 0.2],
        "contrast": [0.5, 0.4, 0.3, 0.2],
        "jpeg": [30, 20, 10, 5],
    }
    deg = {
        k: [_u8_to_tensor([shapes.apply_degradation(a, k, v, seed=i) for i, a in enumerate(clean_u8)]) for v in vs]
        for k, vs in levels.items()
    }
    clean = _u8_to_tensor(clean_u8)
    variants = torch.cat([x for xs in deg.values() for x in xs])
    for name, r in rewards.items():
        c = r.normalize(r.score(clean, []))
        q75 = torch.quantile(r.normalize(r.score(variants, [])).view(-1, len(clean)), 0.75, dim=0)
        assert (c >= q75 - 1e-6).all(), (name, c, q75)
    matching = {"blur": "sharpness", "noise": "noise", "contrast": "contrast"}
    for kind, name in matching.items():
        means = [_mean_norm(rewards[name], clean)] + [_mean_norm(rewards[name], x) for x in deg[kind]]
        assert all(a > b for a, b in zip(means, means[1:])), (kind, name, means)
    sharp = [_mean_raw(rewards["sharpness"], x) for x in [clean] + deg["noise"]]
    assert all(a >= b for a, b in zip(sharp, sharp[1:])), sharp  # noise never raises sharpness
    comp = [_mean_norm(rewards["compressibility"], x) for x in [clean] + deg["jpeg"][:3]]
    assert all(a > b for a, b in zip(comp, comp[1:])), comp  # quality 30 → 10; flat below ≈ 10
