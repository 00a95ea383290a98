"""An evaluation's summary as MLflow tables and a bar plot (besides its single-step ``eval/*`` metrics).

:func:`log_eval_report` logs, into the evaluation's run:

- ``eval/accuracy_table.json``: one row per GenEval category (``category, accuracy, n_judged, se``)
  and an ``overall`` row (the mean over categories, ``n_judged`` summed); absent when nothing was judged;
- ``eval/rewards_table.json``: one row per reward (``reward, mean, std, n, se``);
- ``eval/summary.png``: judge accuracy per category and reward means as bars with ± SE whiskers.

Standard errors: ``sqrt(p(1-p)/n)`` for an accuracy, ``std/sqrt(n)`` for a reward mean (0 when n < 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from miroflow.plots import new_figure
from miroflow.tracking import Tracker

__all__ = ["ACCURACY_TABLE", "REWARDS_TABLE", "SUMMARY_PLOT", "eval_tables", "eval_figure", "log_eval_report"]

ACCURACY_TABLE = "eval/accuracy_table.json"
REWARDS_TABLE = "eval/rewards_table.json"
SUMMARY_PLOT = "eval/summary.png"


def _num(v: Any) -> float:
    """``v`` as a float, NaN for ``None`` or a non-finite value."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def eval_tables(summary: Mapping[str, Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """``(accuracy table, rewards table)`` as ``{column: values}`` of an evaluation ``summary`` (``summary.json``).

    Raises:
        ValueError: ``summary`` lacks ``accuracy`` or ``rewards`` (names the key).
    """
    for key in ("accuracy", "rewards"):
        if not isinstance(summary.get(key), Mapping):
            raise ValueError(f"evaluation summary has no {key!r} mapping (keys: {sorted(summary)})")
    n_judged = summary.get("n_judged") or {}
    acc: dict[str, list[Any]] = {"category": [], "accuracy": [], "n_judged": [], "se": []}
    for tag in sorted(summary["accuracy"]):
        p, n = _num(summary["accuracy"][tag]), int(n_judged.get(tag, 0))
        acc["category"].append(tag)
        acc["accuracy"].append(p)
        acc["n_judged"].append(n)
        acc["se"].append(math.sqrt(p * (1 - p) / n) if n > 0 and math.isfinite(p) else math.nan)
    if acc["category"]:
        acc["category"].append("overall")
        acc["accuracy"].append(_num(summary.get("overall")))
        acc["n_judged"].append(sum(acc["n_judged"]))
        acc["se"].append(math.nan)
    rew: dict[str, list[Any]] = {"reward": [], "mean": [], "std": [], "n": [], "se": []}
    for name in sorted(summary["rewards"]):
        stats = summary["rewards"][name] or {}
        mean, std, n = _num(stats.get("mean")), _num(stats.get("std")), int(stats.get("n") or 0)
        rew["reward"].append(name)
        rew["mean"].append(mean)
        rew["std"].append(std)
        rew["n"].append(n)
        rew["se"].append(std / math.sqrt(n) if n >= 2 and math.isfinite(std) else 0.0)
    return acc, rew


def eval_figure(summary: Mapping[str, Any], title: str | None = None) -> Figure:
    """Bars of judge accuracy per category (the overall mean dashed) and of reward means, ± SE."""
    acc, rew = eval_tables(summary)
    cats = [c for c in acc["category"] if c != "overall"]
    panels = (["accuracy"] if cats else []) + (["rewards"] if rew["reward"] else [])
    if not panels:
        raise ValueError("evaluation summary has neither judged categories nor rewards to plot")
    fig = new_figure(4.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "accuracy":
            vals = acc["accuracy"][: len(cats)]
            ax.bar(cats, vals, yerr=acc["se"][: len(cats)], color="#1f77b4", capsize=3)
            overall = acc["accuracy"][-1]
            if math.isfinite(overall):
                ax.axhline(overall, color="#d62728", ls="--", lw=1, label=f"overall {overall:.3f}")
                ax.legend(fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title("judge accuracy per category", fontsize=9)
        else:
            ax.bar(rew["reward"], rew["mean"], yerr=rew["se"], color="#2ca02c", capsize=3)
            ax.set_title("reward means (normalised)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_eval_report(tracker: Tracker, summary: Mapping[str, Any]) -> None:
    """Log the accuracy and rewards tables and the bar plot of ``summary`` into ``tracker``'s run."""
    acc, rew = eval_tables(summary)
    if acc["category"]:
        tracker.log_table(acc, ACCURACY_TABLE)
    if rew["reward"]:
        tracker.log_table(rew, REWARDS_TABLE)
    if acc["category"] or rew["reward"]:
        model = summary.get("model") or {}
        label = f"{model.get('run_name') or 'model'} step {model.get('step')}" if model else None
        tracker.log_figure(eval_figure(summary, title=label), SUMMARY_PLOT)
