"""Statistics of ``miroflow compare`` (docs/compare.md): each compared metric's standard error from the
evaluation's own samples, and the p-value of a difference against the reference run."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from miroflow.data.scenes import CATEGORIES

__all__ = ["REWARD_PREFIX", "Stat", "standard_errors", "difference_p", "is_category", "ordered_tags"]

#: Prefix of the reward metrics of an evaluation (``eval/reward/<name>``).
REWARD_PREFIX = "eval/reward/"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stat:
    """One compared quantity of one run: ``value`` (the MLflow metric), its standard error and sample.

    ``n`` is the number of images behind it (judged images for an accuracy, images with a value for a
    reward; for ``overall`` the total over categories); ``std`` the per-image std (ddof = 1) of a
    reward, ``None`` for accuracies.
    """

    value: float
    se: float
    n: int
    std: float | None = None


def standard_errors(
    rows: Sequence[Mapping[str, Any]] | None, summary: Mapping[str, Any], metrics: Mapping[str, float]
) -> tuple[dict[str, Stat], str]:
    """Standard errors of every ``eval/...`` metric of one evaluation (module docstring).

    Args:
        rows: the evaluation's ``results.jsonl`` rows, or ``None`` when it cannot be read.
        summary: its ``summary.json`` (``rewards`` {name: {mean, std, n}}, ``accuracy``, ``n_judged``).
        metrics: its MLflow metrics (``eval/reward/<name>``, ``eval/<category>``, ``eval/overall``).

    Returns:
        (``{metric key: Stat}``, the source of the SEs: ``"results.jsonl"`` or ``"summary.json"``).
        Rows whose means disagree with the metrics (by more than 1e-6) are not used.
    """
    out: dict[str, Stat] = {}
    source = "summary.json"
    if rows is not None and _rows_match(rows, metrics):
        source = "results.jsonl"
    rewards = [k[len(REWARD_PREFIX) :] for k in metrics if k.startswith(REWARD_PREFIX)]
    for name in rewards:
        key = f"{REWARD_PREFIX}{name}"
        if source == "results.jsonl":
            vals = np.array([r[name] for r in rows or [] if r.get(name) is not None], dtype=np.float64)
            n = int(vals.size)
            std = float(vals.std(ddof=1)) if n > 1 else math.nan
            out[key] = Stat(metrics[key], std / math.sqrt(n) if n > 1 else math.nan, n, std)
        else:
            r = summary.get("rewards", {}).get(name) or {}
            n = int(r.get("n") or 0)
            std0 = r.get("std")
            std = float(std0) * math.sqrt(n / (n - 1)) if std0 is not None and n > 1 else math.nan
            out[key] = Stat(metrics[key], std / math.sqrt(n) if n > 1 else math.nan, n, std)
    counts = _judged_counts(rows or []) if source == "results.jsonl" else dict(summary.get("n_judged", {}))
    ses: list[float] = []
    for tag in ordered_tags(k[len("eval/") :] for k in metrics if is_category(k)):
        p, n = metrics[f"eval/{tag}"], int(counts.get(tag, 0))
        se = math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else math.nan
        out[f"eval/{tag}"] = Stat(p, se, n)
        ses.append(se)
    if "eval/overall" in metrics and ses:
        total = sum(out[f"eval/{t}"].n for t in counts if f"eval/{t}" in out)
        out["eval/overall"] = Stat(metrics["eval/overall"], math.sqrt(sum(s * s for s in ses)) / len(ses), total)
    return out, source


def is_category(key: str) -> bool:
    return key.startswith("eval/") and not key.startswith(REWARD_PREFIX) and key != "eval/overall"


def ordered_tags(tags: Any) -> list[str]:
    tags = list(dict.fromkeys(tags))
    return [c for c in CATEGORIES if c in tags] + sorted(t for t in tags if t not in CATEGORIES)


def _judged_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("correct") is not None:
            counts[r["tag"]] = counts.get(r["tag"], 0) + 1
    return counts


def _rows_match(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, float]) -> bool:
    """Whether the per-image rows reproduce the run's metrics (the folder may hold a later evaluation)."""
    for key, value in metrics.items():
        if key.startswith(REWARD_PREFIX):
            name = key[len(REWARD_PREFIX) :]
            vals = [r[name] for r in rows if r.get(name) is not None]
        elif is_category(key):
            vals = [float(bool(r["correct"])) for r in rows if r.get("tag") == key[5:] and r.get("correct") is not None]
        else:
            continue
        if not vals or abs(float(np.mean(vals)) - value) > 1e-6:
            log.warning("compare: results.jsonl does not reproduce %s (%s); using summary.json", key, value)
            return False
    return True


def _p_from_z(diff: float, se: float) -> float:
    from scipy import stats as sps  # lazy: keeps the CLI's start fast

    if not math.isfinite(se) or not math.isfinite(diff):
        return math.nan
    if se == 0.0:
        return 1.0 if diff == 0.0 else 0.0
    return float(2.0 * sps.norm.sf(abs(diff) / se))


def difference_p(key: str, ref: Stat, other: Stat) -> tuple[float, str]:
    """Two-sided p-value of ``other.value − ref.value`` and the test's name (module docstring).

    NaN when a side has too few images (a reward with n < 2, an accuracy with n = 0).
    """
    from scipy import stats as sps  # lazy: keeps the CLI's start fast

    diff = other.value - ref.value
    if key.startswith(REWARD_PREFIX):
        if ref.n < 2 or other.n < 2 or ref.std is None or other.std is None:
            return math.nan, "welch"
        if ref.std == 0.0 and other.std == 0.0:
            return (1.0 if diff == 0.0 else 0.0), "welch"
        res = sps.ttest_ind_from_stats(
            other.value, other.std, other.n, ref.value, ref.std, ref.n, equal_var=False, alternative="two-sided"
        )
        return float(res.pvalue), "welch"
    if key == "eval/overall":
        return _p_from_z(diff, math.sqrt(ref.se**2 + other.se**2)), "wald-z"
    if ref.n == 0 or other.n == 0:
        return math.nan, "two-proportion-z"
    pooled = (ref.value * ref.n + other.value * other.n) / (ref.n + other.n)
    se = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / ref.n + 1 / other.n))
    return _p_from_z(diff, se), "two-proportion-z"
