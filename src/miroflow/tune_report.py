"""Figures and the markdown summary of a reward-target search (``miroflow tune-targets``).

Matplotlib only (through :func:`miroflow.plots.new_figure`: an Agg canvas, no pyplot state):

* :func:`objective_figure` — the objective of every completed trial vs its number, the running best,
  and the default trial marked;
* :func:`importance_figure` — Optuna's parameter importances as horizontal bars;
* :func:`heldout_figure` — the held-out objective of the default and the best vector with their
  intervals, and the paired difference.

:func:`summary_markdown` renders ``tune.json`` as a short report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.ticker import MaxNLocator

from miroflow.plots import new_figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["objective_figure", "importance_figure", "heldout_figure", "summary_markdown", "brief_lines"]


def objective_figure(
    trials: Sequence[Mapping[str, Any]], objective: str, title: str, default_trial: int | None = None
) -> "Figure":
    """Objective vs trial number.

    Args:
        trials: ``tune.json`` trial records (``number``, ``state``, ``value``); only completed ones are drawn.
        objective: the objective's label (y axis).
        title: figure title.
        default_trial: number of the default-vector trial (drawn as a star), if any.
    """
    done = [t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None]
    fig = new_figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = [int(t["number"]) for t in done]
    ys = [float(t["value"]) for t in done]
    ax.plot(xs, ys, "o", color="#1f77b4", alpha=0.7, label="trial")
    best: list[float] = []
    for y in ys:
        best.append(y if not best else max(best[-1], y))
    ax.step(xs, best, where="post", color="#d62728", label="best so far")
    for t in done:
        if default_trial is not None and int(t["number"]) == default_trial:
            ax.plot([t["number"]], [t["value"]], "*", color="#2ca02c", markersize=14, label="default (all ones)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def importance_figure(importances: Mapping[str, float], title: str) -> "Figure":
    """Horizontal bars of ``{parameter: importance}`` (largest on top)."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = new_figure(6.5, max(2.0, 0.45 * len(items) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([k for k, _ in items], [float(v) for _, v in items], color="#1f77b4")
    ax.set_xlabel("importance (Optuna, normalised)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _err(iv: Mapping[str, Any]) -> float:
    h = iv.get("half_width")
    return float(h) if h is not None else 0.0


def heldout_figure(heldout: Mapping[str, Any], objective: str, title: str) -> "Figure":
    """Default vs best on the held-out prompts (bars with their intervals) and the paired difference."""
    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    names = ["default", "best"]
    means = [float(heldout[n]["mean"]) for n in names]
    ax.bar(names, means, yerr=[_err(heldout[n]) for n in names], capsize=6, color=["#7f7f7f", "#1f77b4"])
    ax.set_ylabel(objective)
    ax.set_title("held-out objective")
    ax.grid(axis="y", alpha=0.3)
    ax2 = fig.add_subplot(1, 2, 2)
    d = heldout["difference"]
    ax2.errorbar([0], [float(d["mean"])], yerr=[_err(d)], fmt="o", capsize=8, color="#d62728")
    ax2.axhline(0.0, color="black", linewidth=0.8)
    ax2.set_xticks([0], ["best − default"])
    ax2.set_title(f"paired difference ({100 * float(d['confidence']):g}% CI)")
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(iv: Mapping[str, Any]) -> str:
    if iv.get("low") is None:
        return f"{_fmt(iv['mean'])} (no interval: n = {iv['n']})"
    return f"{_fmt(iv['mean'])} [{_fmt(iv['low'])}, {_fmt(iv['high'])}]"


def _vector(v: Mapping[str, Any]) -> str:
    targets = ", ".join(f"{k}={float(x):.3f}" for k, x in v["reward_targets"].items())
    return f"{targets}; ω={float(v['guidance_scale']):.3f}"


def summary_markdown(doc: Mapping[str, Any], top: int = 5) -> str:
    """A markdown report of ``tune.json``: setup, the best trials, the held-out comparison and its verdict."""
    h = doc["heldout"]
    conf = f"{100 * float(h['confidence']):g}%"
    done = [t for t in doc["trials"] if t.get("state") == "COMPLETE" and t.get("value") is not None]
    ranked = sorted(done, key=lambda t: float(t["value"]), reverse=True)[:top]
    lines = [
        f"# Reward-target search: {doc['run_name']}",
        "",
        f"- study `{doc['study_name']}` in `{doc['storage']}`: {doc['n_trials']} completed trials "
        f"({doc['new_trials']} new in this run), objective `{doc['objective']}`"
        + (f" with weights {dict(doc['weights'])}" if doc["objective"] == "mix" else ""),
        f"- searched: {', '.join(doc['space']['rewards']) or 'no reward targets'}"
        + (f"; ω in {doc['space']['guidance_range']}" if doc["space"]["guidance_range"] else ""),
        f"- checkpoint `{doc['checkpoint']}`; MLflow parent run `{doc['parent_run_id']}`",
        "",
        "## Best trials (search prompts)",
        "",
        "| trial | objective | vector |",
        "|---:|---:|---|",
    ]
    lines += [f"| {t['number']} | {_fmt(t['value'])} | {_vector(t['point'])} |" for t in ranked]
    lines += [
        "",
        f"## Held-out re-evaluation ({h['n_prompts']} prompts, seed {h['seed']}, {conf} t-intervals over prompts)",
        "",
        "| vector | objective | targets |",
        "|---|---:|---|",
        f"| default | {_ci(h['default'])} | {_vector(doc['default'])} |",
        f"| best (trial {doc['best']['trial']}) | {_ci(h['best'])} | {_vector(doc['best'])} |",
        f"| best − default (paired) | {_ci(h['difference'])} | |",
        "",
    ]
    if doc["beats_default"]:
        verdict = f"The best vector beats the default on the held-out prompts: the {conf} interval of the paired difference lies above 0."
    else:
        verdict = (
            f"The best vector does **not** beat the default by more than the interval on the held-out prompts "
            f"(the {conf} interval of the paired difference includes or lies below 0)."
        )
    lines += [verdict, ""]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def brief_lines(doc: Mapping[str, Any]) -> list[str]:
    """The few lines ``miroflow tune-targets`` prints: the study, the held-out numbers, the verdict, where it went."""
    h = doc["heldout"]
    return [
        f"tune-targets: study {doc['study_name']}: {doc['n_trials']} completed trials ({doc['new_trials']} new), "
        f"best trial {doc['best']['trial']} ({_vector(doc['best'])})",
        f"held-out ({h['n_prompts']} prompts, {100 * float(h['confidence']):g}% CI): best {_ci(h['best'])}, "
        f"default {_ci(h['default'])}, paired difference {_ci(h['difference'])}",
        f"best beats the all-ones default by more than the interval: {'yes' if doc['beats_default'] else 'no'}",
        f"-> {doc['output']} (summary.md, tune.json); manifest: {doc.get('manifest')}",
    ]
