"""Figures for evaluation, sweeps and test-time scaling (matplotlib, Agg backend).

Every function builds a :class:`matplotlib.figure.Figure` attached to an Agg canvas directly
(no ``pyplot``): no global figure state, no GUI backend, safe from threads (Prefect task
runners) and never changes the user's backend. Save with :func:`save_png` (a path) or
:func:`figure_png` (bytes for :mod:`miroflow.storage`); MLflow's ``log_figure`` takes them as is.

Figures:

* :func:`radar` — reward means of several models (or sweep points) on one polar chart;
* :func:`tts_curves` — best-of-N curves: selected reward vs N (or vs denoiser evaluations),
  one line per model (e.g. MIRO vs baseline), from :func:`miroflow.tts.best_of_n` dicts;
* :func:`tradeoff` — a swept value (ω, a reward target) vs every reward and judge accuracy;
* :func:`image_grid` — ``[R, C, H, W, 3]`` images with row and column labels (a figure, or a
  plain uint8 mosaic with ``as_array=True``);
* :func:`convergence` — evaluation curves (judge accuracy, every reward) vs training step, one
  line per run (the study's convergence figure);
* :func:`best_of_n_panels` — one best-of-N panel per reward (selected by itself) and judge
  accuracy, MIRO vs baseline with MIRO's single sample as reference (the study's figure);
* :func:`hacking_trajectories` — metrics ± SE along eval points or a sweep grid with the
  reward-hacking monitor's flagged intervals shaded (:mod:`miroflow.hacking`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "new_figure",
    "radar",
    "tts_curves",
    "tradeoff",
    "image_grid",
    "convergence",
    "best_of_n_panels",
    "hacking_trajectories",
    "save_png",
    "figure_png",
    "figure_to_array",
]

#: Colour cycle (matplotlib's tab10) so that a model keeps its colour across figures.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def new_figure(width: float = 6.0, height: float = 4.0, dpi: int = 100) -> Figure:
    """A figure of ``width × height`` inches on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _finite(v: Any) -> float:
    """``None``/non-finite -> NaN (matplotlib leaves a gap), else ``float(v)``."""
    if v is None:
        return math.nan
    f = float(v)
    return f if math.isfinite(f) else math.nan


# --------------------------------------------------------------------------- radar
def radar(
    models: Mapping[str, Mapping[str, float | None]], title: str | None = None, limits: tuple[float, float] = (0.0, 1.0)
) -> Figure:
    """Per-model radar (spider) chart of reward means.

    Args:
        models: ``{model name: {reward name: mean}}``; the axes are the union of reward names
            in first-seen order; a reward a model lacks (or ``None``/NaN) is drawn at the centre.
        title: optional title.
        limits: radial range (normalised rewards live in ``[0, 1]``); values outside stretch it.

    Raises:
        ValueError: no models, or fewer than 3 rewards (a radar needs 3 axes).
    """
    if not models:
        raise ValueError("radar: no models to draw")
    axes_names: list[str] = []
    for vals in models.values():
        for name in vals:
            if name not in axes_names:
                axes_names.append(name)
    if len(axes_names) < 3:
        raise ValueError(f"radar: needs at least 3 rewards, got {axes_names}")
    k = len(axes_names)
    angles = np.linspace(0.0, 2 * math.pi, k, endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    lo, hi = limits
    all_vals = [_finite(v.get(a)) for v in models.values() for a in axes_names]
    finite = [v for v in all_vals if math.isfinite(v)]
    if finite:
        lo, hi = min(lo, min(finite)), max(hi, max(finite))
    fig = new_figure(6.0, 6.0)
    ax = fig.add_subplot(111, projection="polar")
    for n, (name, vals) in enumerate(models.items()):
        ys = np.array([_finite(vals.get(a)) for a in axes_names])
        ys = np.where(np.isfinite(ys), ys, lo)
        ys = np.concatenate([ys, ys[:1]])
        color = _COLORS[n % len(_COLORS)]
        ax.plot(closed, ys, color=color, linewidth=2, label=name)
        ax.fill(closed, ys, color=color, alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels(axes_names)
    ax.set_ylim(lo, hi)
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1), fontsize=8)
    if title:
        ax.set_title(title, pad=20)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- TTS curves
def _tts_series(result: Mapping[str, Any], reward: str) -> list[float]:
    curves: Mapping[str, Any] = result.get("curves", {})
    if reward not in curves:
        raise ValueError(f"tts_curves: {reward!r} is not in the results; available: {', '.join(curves)}")
    return [_finite(v) for v in curves[reward]]


def tts_curves(
    results: Mapping[str, Mapping[str, Any]],
    reward: str,
    x: Literal["n", "nfe"] = "n",
    title: str | None = None,
    hlines: Mapping[str, float] | None = None,
) -> Figure:
    """Best-of-N curves: mean ``reward`` of the selected images vs N, one line per model.

    Args:
        results: ``{model name: best_of_n dict}`` (:func:`miroflow.tts.best_of_n`: ``ns``,
            ``curves`` {name: [mean per N]}, ``compute``), e.g. ``{"MIRO": ..., "baseline": ...}``.
        reward: a key of ``curves`` (a reward name, ``"accuracy"`` or ``"judge_score"``).
        x: ``"n"`` (candidates, log2 axis) or ``"nfe"`` (denoiser evaluations per image, log axis).
        title: optional title (default: reward and the selection reward).
        hlines: optional reference levels ``{label: value}`` drawn dashed (e.g. a single MIRO sample).
    """
    if not results:
        raise ValueError("tts_curves: no results to draw")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    select = set()
    for n, (name, res) in enumerate(results.items()):
        ys = _tts_series(res, reward)
        if x == "nfe":
            xs = [float(v) for v in res["compute"]["denoiser_evals_per_image"]]
        else:
            xs = [float(v) for v in res["ns"]]
        select.add(str(res.get("select_by", "?")))
        ax.plot(
            xs, ys, marker="o", color=_COLORS[n % len(_COLORS)], label=f"{name} (select by {res.get('select_by', '?')})"
        )
    for n, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(float(value), linestyle="--", color=_COLORS[(n + len(results)) % len(_COLORS)], label=label)
    ax.set_xscale("log", base=2 if x == "n" else 10)
    ax.set_xlabel("N (candidates per prompt)" if x == "n" else "denoiser evaluations per image")
    ax.set_ylabel(f"mean {reward} of selected images")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"best-of-N: {reward} (selected by {', '.join(sorted(select))})")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- trade-off
def tradeoff(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    xlabel: str,
    title: str | None = None,
    ylabel: str = "mean over images",
) -> Figure:
    """A swept value vs several metrics (each reward's mean, judge accuracy), one line per metric.

    Args:
        xs: the swept values (e.g. ω grid or target values), length K.
        series: ``{metric name: K values}`` (``None``/NaN = gap).
        xlabel: what was swept (e.g. ``"target sharpness"``).

    Raises:
        ValueError: empty ``series`` or a series whose length is not K.
    """
    if not series:
        raise ValueError("tradeoff: no series to draw")
    k = len(xs)
    for name, ys in series.items():
        if len(ys) != k:
            raise ValueError(f"tradeoff: series {name!r} has {len(ys)} values for {k} x values")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    for n, (name, ys) in enumerate(series.items()):
        style = "--" if name in ("accuracy", "overall", "judge_accuracy") else "-"
        ax.plot(
            [float(x) for x in xs],
            [_finite(y) for y in ys],
            style,
            marker="o",
            color=_COLORS[n % len(_COLORS)],
            label=name,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- image grid
def _mosaic(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """``[R, C, H, W, 3]`` uint8 -> ``[R·(H+pad)+pad, C·(W+pad)+pad, 3]`` uint8 on white."""
    r, c, h, w, _ = images.shape
    out = np.full((r * (h + pad) + pad, c * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = images[i, j]
    return out


@overload
def image_grid(
    images: np.ndarray,
    row_labels: Sequence[str] | None = ...,
    col_labels: Sequence[str] | None = ...,
    *,
    as_array: Literal[False] = ...,
    title: str | None = ...,
) -> Figure: ...
@overload
def image_grid(
    images: np.ndarray,
    row_labels: Sequence[str] | None = ...,
    col_labels: Sequence[str] | None = ...,
    *,
    as_array: Literal[True],
    title: str | None = ...,
) -> np.ndarray: ...
def image_grid(
    images: np.ndarray,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    as_array: bool = False,
    title: str | None = None,
) -> Figure | np.ndarray:
    """A labelled grid of images (e.g. one sweep row: prompts × ω values on fixed seeds).

    Args:
        images: ``[R, C, H, W, 3]`` uint8 (or float in [0, 1]).
        row_labels: R labels (e.g. prompts), shown left of each row.
        col_labels: C labels (e.g. ``"ω=0.5"``), shown above each column.
        as_array: return the unlabelled mosaic ``[R·(H+2)+2, C·(W+2)+2, 3]`` uint8 instead of a figure.

    Raises:
        ValueError: a wrong shape or label count (the message names them).
    """
    arr = np.asarray(images)
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise ValueError(f"image_grid: images must have shape [R, C, H, W, 3], got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    r, c = arr.shape[:2]
    if row_labels is not None and len(row_labels) != r:
        raise ValueError(f"image_grid: {len(row_labels)} row labels for {r} rows")
    if col_labels is not None and len(col_labels) != c:
        raise ValueError(f"image_grid: {len(col_labels)} column labels for {c} columns")
    if as_array:
        return _mosaic(arr)
    cell = 1.3
    left = 2.6 if row_labels is not None else 0.2
    fig = new_figure(left + c * cell, 0.5 + r * cell + (0.4 if title else 0.0))
    axes = fig.subplots(r, c, squeeze=False)
    for i in range(r):
        for j in range(c):
            ax = axes[i][j]
            ax.imshow(arr[i, j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_labels is not None:
                ax.set_title(str(col_labels[j]), fontsize=8)
            if j == 0 and row_labels is not None:
                label = str(row_labels[i])
                ax.set_ylabel(
                    label if len(label) <= 40 else label[:37] + "...", fontsize=7, rotation=0, ha="right", va="center"
                )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- study figures
def convergence(curves: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> Figure:
    """Evaluation curves vs training step: one panel per metric, one line per run.

    Args:
        curves: ``{run name: {"steps": [K steps], "metrics": {key: [K values]}}}``; runs whose name
            starts with ``baseline`` are dashed.
        keys: the metrics to draw, one panel each (``"overall"`` is titled as judge accuracy).

    Raises:
        ValueError: no runs or no keys.
    """
    if not curves or not keys:
        raise ValueError("convergence: no runs or no metrics to draw")
    fig = new_figure(11, 6.2)
    axes = fig.subplots(2, math.ceil(len(keys) / 2), squeeze=False).ravel()
    colors = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(curves)}
    for ax, k in zip(axes, keys):
        for name, c in curves.items():
            ys = [_finite(v) for v in c["metrics"].get(k, [])]
            ax.plot(
                c["steps"][: len(ys)],
                ys,
                marker="o",
                ms=3,
                color=colors[name],
                linestyle="--" if name.startswith("baseline") else "-",
                label=name,
            )
        ax.set_title("judge accuracy (overall)" if k == "overall" else k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def best_of_n_panels(
    docs: Mapping[str, Mapping[str, Any]],
    rewards: Sequence[str],
    judge_select_by: str = "shapes_alignment",
    reference: str = "miro",
) -> Figure:
    """Best-of-N per reward: the reward of the images selected by that reward vs N, one line per model,
    plus a judge-accuracy panel (selected by ``judge_select_by``); ``reference``'s N=1 dotted.

    Args:
        docs: ``{model label: {"select_by": {reward: {"ns": [...], "curves": {metric: [...]}}}}}``
            (the study's best-of-N documents, e.g. ``{"miro": ..., "baseline": ...}``).
        rewards: the rewards, one panel each, then the accuracy panel.

    Raises:
        ValueError: no models, or ``reference`` is not one of them.
    """
    if not docs or reference not in docs:
        raise ValueError(f"best_of_n_panels: need the reference model {reference!r} among {list(docs)}")
    fig = new_figure(11, 6.2)
    axes = fig.subplots(2, math.ceil((len(rewards) + 1) / 2), squeeze=False).ravel()
    for ax, r in zip(axes, [*rewards, "accuracy"]):
        sel = judge_select_by if r == "accuracy" else r
        for n, (label, doc) in enumerate(docs.items()):
            by = doc["select_by"].get(sel)
            if by:
                ax.plot(
                    by["ns"],
                    [_finite(v) for v in by["curves"][r]],
                    marker="o",
                    ms=3,
                    label=f"{label} best-of-N",
                    color=_COLORS[n % len(_COLORS)],
                )
        ref = docs[reference]["select_by"].get(sel)
        if ref:
            ax.axhline(
                _finite(ref["curves"][r][0]),
                color=_COLORS[list(docs).index(reference) % len(_COLORS)],
                linestyle=":",
                label=f"{reference.upper() if reference == 'miro' else reference} N=1",
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{r} (selected by {sel})", fontsize=9)
        ax.set_xlabel("N", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(rewards) + 1 :]:
        ax.axis("off")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- output
def figure_png(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure encoded as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write the figure as a PNG file (parent directories are created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(figure_png(fig, dpi))
    return p


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render the figure to ``[H, W, 3]`` uint8 (e.g. for ``tracker.log_image``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


# --------------------------------------------------------------------------- reward-hacking monitor
def hacking_trajectories(panels: Sequence[Mapping[str, Any]], k: float = 2.0) -> Figure:
    """Metric trajectories with the reward-hacking monitor's flagged intervals shaded (:mod:`miroflow.hacking`).

    Args:
        panels: one subplot each, ``{"title": str, "xlabel": str, "x": [K positions], "series":
            {metric: [K means]}, "se": {metric: [K standard errors]}, "flagged": [(x_start, x_end,
            label), ...]}``; every metric is drawn as mean ± SE (the judge's accuracy dashed), every
            flagged interval as a red band with its label (e.g. ``"↑ sharpness\n↓ judge_accuracy"``).
        k: the monitor's threshold in standard errors (shown in each title).

    Raises:
        ValueError: no panels, or a series (or its SE) whose length is not K.
    """
    if not panels:
        raise ValueError("hacking_trajectories: no panels to draw")
    fig = new_figure(5.5 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        xs = [float(x) for x in panel["x"]]
        for n, (name, ys) in enumerate(panel["series"].items()):
            err = panel.get("se", {}).get(name, [0.0] * len(xs))
            if len(ys) != len(xs) or len(err) != len(xs):
                raise ValueError(
                    f"hacking_trajectories: {name!r} has {len(ys)} values / {len(err)} SEs for {len(xs)} x"
                )
            ax.errorbar(
                xs,
                [_finite(y) for y in ys],
                yerr=[_finite(e) for e in err],
                fmt="--o" if name in ("judge_accuracy", "overall", "accuracy") else "-o",
                ms=3,
                capsize=2,
                color=_COLORS[n % len(_COLORS)],
                label=name,
            )
        flagged = list(panel.get("flagged", []))
        for i, (x0, x1, label) in enumerate(flagged):
            ax.axvspan(float(x0), float(x1), color="#d62728", alpha=0.12 if i % 2 else 0.2, lw=0)
            ax.text(
                (float(x0) + float(x1)) / 2,
                0.98 if i % 2 == 0 else 0.84,
                label,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=5,
                color="#d62728",
                clip_on=True,
            )
        verdict = f"{len(flagged)} flagged interval(s), red" if flagged else "no flags"
        ax.set_title(f"{panel.get('title', '')}\n{verdict} (k = {k:g})", fontsize=9)
        ax.set_xlabel(str(panel.get("xlabel", "")), fontsize=8)
        ax.set_ylabel("mean ± SE", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig
