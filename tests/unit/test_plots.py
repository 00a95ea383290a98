"""Figures render (Agg, no pyplot) to PNG files with non-trivial content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miroflow import plots
from miroflow.tts import best_of_n


def _png_stats(path: Path) -> tuple[tuple[int, int], int]:
    """(size, number of distinct colours) of a PNG file."""
    img = np.asarray(Image.open(path).convert("RGB"))
    return img.shape[:2], len(np.unique(img.reshape(-1, 3), axis=0))


def _nonwhite_fraction(path: Path) -> float:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return float((img.sum(axis=-1) < 3 * 250).mean())


def test_radar_renders_every_model(tmp_path: Path) -> None:
    models = {
        "MIRO": {"sharpness": 0.8, "contrast": 0.7, "noise": 0.9, "shapes_alignment": 0.6},
        "baseline": {"sharpness": 0.4, "contrast": 0.5, "noise": 0.6, "shapes_alignment": None},
    }
    fig = plots.radar(models, title="reward means")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sharpness", "contrast", "noise", "shapes_alignment"]
    assert len(ax.lines) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["MIRO", "baseline"]
    # the MIRO polygon closes on itself and reaches its values
    ys = ax.lines[0].get_ydata()
    assert list(ys) == pytest.approx([0.8, 0.7, 0.9, 0.6, 0.8])
    p = plots.save_png(fig, tmp_path / "radar.png")
    size, colours = _png_stats(p)
    assert size[0] > 300 and size[1] > 300 and colours > 20 and _nonwhite_fraction(p) > 0.02


def test_radar_needs_three_axes() -> None:
    with pytest.raises(ValueError, match="at least 3 rewards"):
        plots.radar({"m": {"a": 1.0, "b": 0.5}})
    with pytest.raises(ValueError, match="no models"):
        plots.radar({})


def test_tts_curves_from_best_of_n_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    miro = best_of_n(
        {"aesthetic": 0.6 + 0.3 * rng.random((10, 16)), "hps": rng.random((10, 16))},
        select_by="aesthetic",
        ns=[1, 2, 4, 8, 16],
        steps=20,
    )
    base = best_of_n(
        {"aesthetic": 0.3 * rng.random((10, 16)), "hps": rng.random((10, 16))},
        select_by="aesthetic",
        ns=[1, 2, 4, 8, 16],
        steps=20,
    )
    fig = plots.tts_curves(
        {"MIRO": miro, "baseline": base}, "aesthetic", hlines={"MIRO, one sample": miro["curves"]["aesthetic"][0]}
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [1, 2, 4, 8, 16]
    assert list(ax.lines[1].get_ydata()) == pytest.approx(base["curves"]["aesthetic"])
    p = plots.save_png(fig, tmp_path / "tts.png")
    assert _png_stats(p)[1] > 20 and _nonwhite_fraction(p) > 0.02
    fig2 = plots.tts_curves({"MIRO": miro}, "hps", x="nfe")  # cross-metric curve against compute
    assert list(fig2.axes[0].lines[0].get_xdata()) == [20, 40, 80, 160, 320]
    with pytest.raises(ValueError, match="'pickscore' is not in the results; available: aesthetic, hps"):
        plots.tts_curves({"MIRO": miro}, "pickscore")


def test_tradeoff_curves(tmp_path: Path) -> None:
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    series = {
        "sharpness": [0.1, 0.3, 0.5, 0.6, 0.8],
        "contrast": [0.5, 0.5, None, 0.6, 0.6],
        "overall": [0.7, 0.6, 0.55, 0.5, 0.4],
    }
    fig = plots.tradeoff(xs, series, xlabel="target sharpness", title="trade-off")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and ax.get_xlabel() == "target sharpness"
    assert np.isnan(ax.lines[1].get_ydata()[2])  # None is a gap
    p = plots.save_png(fig, tmp_path / "tradeoff.png")
    assert _png_stats(p)[1] > 20
    with pytest.raises(ValueError, match="series 'x' has 2 values for 5 x values"):
        plots.tradeoff(xs, {"x": [1.0, 2.0]}, xlabel="t")


def test_image_grid_figure_and_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 4, 16, 16, 3), dtype=np.uint8)
    mosaic = plots.image_grid(images, as_array=True)
    assert mosaic.shape == (3 * 18 + 2, 4 * 18 + 2, 3) and mosaic.dtype == np.uint8
    np.testing.assert_array_equal(mosaic[2 + 18 : 2 + 18 + 16, 2 + 2 * 18 : 2 + 2 * 18 + 16], images[1, 2])
    fig = plots.image_grid(
        images,
        ["a red circle", "two blue squares", "a green triangle"],
        ["ω=0", "ω=0.5", "ω=1", "ω=2"],
        title="guidance",
    )
    assert len(fig.axes) == 12 and fig.axes[1].get_title() == "ω=0.5" and fig.axes[4].get_ylabel() == "two blue squares"
    p = plots.save_png(fig, tmp_path / "grid.png")
    size, colours = _png_stats(p)
    assert colours > 200  # the random images are in there
    arr = plots.figure_to_array(fig)
    assert arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8
    with pytest.raises(ValueError, match=r"\[R, C, H, W, 3\]"):
        plots.image_grid(images[0])
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        plots.image_grid(images, ["a", "b"])


def test_png_bytes_is_a_png() -> None:
    fig = plots.tradeoff([0, 1], {"r": [0.0, 1.0]}, xlabel="x")
    data = plots.figure_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_no_pyplot_state() -> None:
    import sys

    plots.radar({"m": {"a": 1.0, "b": 0.5, "c": 0.2}})
    # the module builds figures on Agg canvases directly; pyplot is never needed
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
