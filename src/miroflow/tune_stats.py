"""The objective of a reward-target search and its confidence intervals (``miroflow tune-targets``).

An objective is a weighted sum of *components* (:func:`objective_weights`): ``"accuracy"`` (the
judge's ``eval/overall``: the mean over categories of each category's fraction of correct images)
and reward names (the mean of that reward's finite normalised values).

For intervals, each component is written as a mean over the evaluation's N images of a per-image
contribution ``u_i`` whose plain mean is exactly the summary's number:

* accuracy: ``u_i = N · correct_i / (C · n_tag(i))`` for a judged image (C judged categories,
  ``n_tag`` judged images of its category), 0 for an unjudged one;
* reward r: ``u_i = N · r_i / n_r`` for a finite value (``n_r`` finite values), 0 otherwise.

Images of one prompt share the prompt, so they are not independent: :func:`prompt_values` averages
the weighted contributions per prompt, and :func:`t_interval` is a Student-t interval over prompts
(with one image per prompt that is the per-image interval). With the same prompts and seeds for two
vectors, :func:`paired_difference` takes the interval of the per-prompt differences, which removes
the prompt-to-prompt variance both share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ACCURACY",
    "Interval",
    "objective_weights",
    "objective_value",
    "prompt_values",
    "t_interval",
    "paired_difference",
]

#: The component name of judge accuracy (``eval/overall``) in an objective.
ACCURACY = "accuracy"


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval over ``n`` units (prompts); ``low``/``high`` are
    ``None`` when ``n < 2`` (no spread to estimate)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (``None`` without an interval)."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    def to_dict(self) -> dict[str, Any]:
        """``{"mean", "low", "high", "half_width", "n", "confidence"}`` (JSON-safe)."""
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "half_width": self.half_width,
            "n": self.n,
            "confidence": self.confidence,
        }


def objective_weights(objective: str, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Components and weights of ``tune.objective``: ``accuracy`` -> ``{"accuracy": 1}``,
    ``reward:<name>`` -> ``{name: 1}``, ``mix`` -> ``weights`` (zero weights dropped)."""
    if objective == ACCURACY:
        return {ACCURACY: 1.0}
    if objective.startswith("reward:"):
        return {objective.split(":", 1)[1]: 1.0}
    if objective == "mix":
        return {k: float(w) for k, w in (weights or {}).items() if w != 0}
    raise ValueError(f"tune.objective: {objective!r} is not 'accuracy', 'reward:<name>' or 'mix'")


def objective_value(summary: Mapping[str, Any], weights: Mapping[str, float]) -> float | None:
    """The objective of one evaluation summary (:func:`miroflow.evaluate.run_evaluate`'s dict);
    ``None`` when a component has no value (no judged image, a reward without a finite value)."""
    total = 0.0
    for name, w in weights.items():
        if name == ACCURACY:
            v = summary.get("overall")
        else:
            v = (summary.get("rewards", {}).get(name) or {}).get("mean")
        if v is None or not math.isfinite(float(v)):
            return None
        total += w * float(v)
    return total


def _contributions(rows: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    """Per-image contributions ``u`` [N] of one component (see the module docstring)."""
    n = len(rows)
    u = np.zeros(n, dtype=np.float64)
    if name == ACCURACY:
        judged = [i for i, r in enumerate(rows) if r.get("correct") is not None]
        counts: dict[str, int] = {}
        for i in judged:
            counts[rows[i]["tag"]] = counts.get(rows[i]["tag"], 0) + 1
        if not counts:
            raise ValueError("objective component 'accuracy': no judged image (the judge needs data.domain=shapes)")
        for i in judged:
            u[i] = n * float(bool(rows[i]["correct"])) / (len(counts) * counts[rows[i]["tag"]])
        return u
    vals = np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows], dtype=np.float64)
    finite = np.isfinite(vals)
    if not finite.any():
        raise ValueError(f"objective component {name!r}: no finite value in the evaluation (is it scored?)")
    u[finite] = n * vals[finite] / int(finite.sum())
    return u


def prompt_values(rows: Sequence[Mapping[str, Any]], weights: Mapping[str, float]) -> tuple[list[int], np.ndarray]:
    """Per-prompt objective values of an evaluation's ``results.jsonl`` rows.

    Returns:
        ``(prompt indices sorted, values [P] float64)``: ``values[k]`` is the mean over the images of
        prompt ``indices[k]`` of ``Σ_c w_c · u_i^c``. With the same number of images per prompt,
        ``values.mean()`` equals :func:`objective_value` of the evaluation's summary.
    """
    if not rows:
        raise ValueError("no evaluation rows")
    total = np.zeros(len(rows), dtype=np.float64)
    for name, w in weights.items():
        total += w * _contributions(rows, name)
    by_prompt: dict[int, list[float]] = {}
    for r, v in zip(rows, total):
        by_prompt.setdefault(int(r["prompt_index"]), []).append(float(v))
    order = sorted(by_prompt)
    return order, np.array([np.mean(by_prompt[p]) for p in order], dtype=np.float64)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean and Student-t ``confidence`` interval of ``values`` (one per unit, e.g. per prompt)."""
    from scipy import stats  # lazy: scipy's import is slow and only the report needs it

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval of no values")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, int(x.size), confidence)
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)) * se
    return Interval(mean, mean - half, mean + half, int(x.size), confidence)


def paired_difference(
    a_rows: Sequence[Mapping[str, Any]],
    b_rows: Sequence[Mapping[str, Any]],
    weights: Mapping[str, float],
    confidence: float = 0.95,
) -> Interval:
    """Interval of the objective difference ``a − b`` paired by prompt.

    Raises:
        ValueError: the two evaluations do not hold the same (prompt, seed) images.
    """
    key_a = sorted((int(r["prompt_index"]), int(r["seed"])) for r in a_rows)
    key_b = sorted((int(r["prompt_index"]), int(r["seed"])) for r in b_rows)
    if key_a != key_b:
        raise ValueError("paired difference: the two evaluations differ in prompts or seeds")
    _, va = prompt_values(a_rows, weights)
    _, vb = prompt_values(b_rows, weights)
    return t_interval(va - vb, confidence)
