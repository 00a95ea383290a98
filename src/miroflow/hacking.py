"""Reward-hacking monitor: flag one reward rising while the judge or another reward falls beyond noise.

Between two evaluations A → B (consecutive eval points of a training run, or neighbouring points of
a sweep grid ordered by its swept value), a :class:`Flag` says: reward ``r`` rose by
``Δr > k·SE(Δr)`` while the judge's accuracy (or another reward ``q``) fell by ``−Δq > k·SE(Δq)``.
The standard errors come from each evaluation's own samples:

* a reward's mean over ``n`` images: ``SE = std / sqrt(n)`` (``std`` as the evaluation stores it,
  the population std of the finite per-image values);
* the judge: ``overall`` is the mean over C categories of the accuracy ``p_c`` over ``n_c`` judged
  images, so ``SE = sqrt(Σ_c p_c (1 − p_c) / n_c) / C`` (binomial per category; one pooled
  ``sqrt(p (1 − p) / n)`` when the images carry no categories);
* a difference of two independent means: ``SE(Δ) = sqrt(SE_A² + SE_B²)``. Sweep points share their
  seeds, so the true SE of a paired difference is smaller: the test is conservative there.

Entry points:

* :func:`monitor_evals` — the pure monitor over a sequence of evaluation summaries (the
  ``summary.json`` layout of :func:`miroflow.evaluate.run_evaluate`, what the study keeps per run);
* :func:`point_from_values` — an :class:`EvalPoint` from per-image values (rewards, judge verdicts);
* :func:`monitor_sweep` — each ω / target grid of a ``sweep.json`` in order of its swept value;
* :func:`monitor_best_of_n` — a best-of-N result along its N grid;
* :class:`miroflow.hacking_monitor.TrainingMonitor` — the hook at a training run's eval points;
* :func:`flag_tags`, :func:`figure` — the MLflow tags and the plot with flagged intervals shaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from miroflow.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "JUDGE",
    "DEFAULT_K",
    "HackingInputError",
    "Estimate",
    "EvalPoint",
    "Flag",
    "as_point",
    "point_from_values",
    "monitor_evals",
    "monitor_sweep",
    "monitor_best_of_n",
    "best_of_n_points",
    "DEFAULT_AGAINST",
    "sweep_point",
    "sweep_figure",
    "flag_tags",
    "figure",
]

log = logging.getLogger(__name__)

#: Metric name of the judge's accuracy (``overall``, mean over categories) in points and flags.
JUDGE = "judge_accuracy"
#: Default number of standard errors a change must exceed to count.
DEFAULT_K = 2.0
#: Metrics whose fall is a flag by default: the judge only. Rewards that oppose each other by nature
#: (a cleaner image is sharper and compresses worse) move apart in ordinary training, so a reward
#: falling while another rises is a flag only for the rewards a caller names (docs/hacking.md).
DEFAULT_AGAINST: tuple[str, ...] = (JUDGE,)
#: Sweep grids the monitor walks, in order of their swept value ``x``.
SWEEP_GRIDS = ("guidance", "target")


class HackingInputError(InputError, ValueError):
    """An evaluation the monitor cannot use (no samples, a missing reward, a bad value); names it."""


# --------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Estimate:
    """One metric of one evaluation: its ``mean``, the standard error ``se`` of that mean and the
    number of samples ``n`` (images; judged images for the judge)."""

    mean: float
    se: float
    n: int


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: ``where`` it was taken (``"step 500"``, ``"guidance/omega=0.5"``), its
    position ``x`` (training step or swept value; ``None`` = its index) and ``metrics``
    ``{reward name | JUDGE: Estimate}``."""

    where: str
    x: float | None
    metrics: dict[str, Estimate]


@dataclass(frozen=True)
class Flag:
    """Reward ``rose`` went up by ``rise`` (± ``rise_se``) while ``fell`` (a reward or
    :data:`JUDGE`) changed by ``fall`` (< 0, ± ``fall_se``) from ``start`` to ``end``
    (positions ``x_start`` → ``x_end``); both changes exceed ``k`` standard errors."""

    rose: str
    fell: str
    rise: float
    rise_se: float
    fall: float
    fall_se: float
    start: str
    end: str
    x_start: float | None
    x_end: float | None
    k: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Flag:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**dict(d))

    def text(self) -> str:
        """One line: ``sharpness +0.120 ± 0.030 while judge_accuracy −0.100 ± 0.040 (A → B, k = 2)``."""
        return (
            f"{self.rose} {self.rise:+.3f} ± {self.rise_se:.3f} while {self.fell} {self.fall:+.3f} ± "
            f"{self.fall_se:.3f} ({self.start} → {self.end}, k = {self.k:g})"
        )


# --------------------------------------------------------------------------- building points
def _number(v: Any, what: str) -> float:
    """``v`` as a finite float, else a :class:`HackingInputError` naming ``what``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
        raise HackingInputError(f"hacking: {what} must be a finite number, got {v!r}")
    return float(v)


def _count(v: Any, what: str) -> int:
    """``v`` as a sample count >= 1, else a :class:`HackingInputError` naming ``what``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise HackingInputError(
            f"hacking: {what} must be a sample count >= 1, got {v!r} (no samples, no noise estimate)"
        )
    return int(v)


def _reward_estimate(stat: Any, where: str, name: str) -> Estimate:
    """``{mean, std, n}`` of reward ``name`` at ``where`` -> :class:`Estimate` (SE = std / sqrt(n))."""
    if not isinstance(stat, Mapping):
        raise HackingInputError(f"hacking: {where}: reward {name!r} must be {{mean, std, n}}, got {stat!r}")
    for key in ("mean", "std", "n"):
        if key not in stat:
            raise HackingInputError(f"hacking: {where}: reward {name!r} has no {key!r} (needs mean, std and n)")
    n = _count(stat["n"], f"{where}: reward {name!r} n")
    std = _number(stat["std"], f"{where}: reward {name!r} std")
    if std < 0:
        raise HackingInputError(f"hacking: {where}: reward {name!r} std is negative ({std})")
    return Estimate(_number(stat["mean"], f"{where}: reward {name!r} mean"), std / math.sqrt(n), n)


def _judge_estimate(accuracy: Mapping[str, Any], n_judged: Mapping[str, Any], where: str) -> Estimate:
    """The mean over categories of per-category accuracy, with its binomial SE
    ``sqrt(Σ p_c (1 − p_c) / n_c) / C``."""
    ps, var, total = [], 0.0, 0
    for tag, p_raw in accuracy.items():
        if tag not in n_judged:
            raise HackingInputError(f"hacking: {where}: accuracy of {tag!r} has no n_judged count")
        p = _number(p_raw, f"{where}: accuracy of {tag!r}")
        if not 0.0 <= p <= 1.0:
            raise HackingInputError(f"hacking: {where}: accuracy of {tag!r} is {p}, outside [0, 1]")
        n = _count(n_judged[tag], f"{where}: n_judged of {tag!r}")
        ps.append(p)
        var += p * (1.0 - p) / n
        total += n
    c = len(ps)
    return Estimate(float(np.mean(ps)), math.sqrt(var) / c, total)


def as_point(doc: EvalPoint | Mapping[str, Any] | Any, index: int = 0) -> EvalPoint:
    """An :class:`EvalPoint` from an evaluation summary (see :func:`monitor_evals` for the layout),
    an object with ``to_dict()`` giving one (an :class:`~miroflow.results.EvalSummary`), or an
    :class:`EvalPoint` (returned as is). ``index`` names a point that has no ``where``.

    Raises:
        HackingInputError: a field is missing or unusable (names the point, reward or category).
    """
    if isinstance(doc, EvalPoint):
        return doc
    if not isinstance(doc, Mapping) and callable(getattr(doc, "to_dict", None)):
        doc = doc.to_dict()
    if not isinstance(doc, Mapping):
        raise HackingInputError(f"hacking: point #{index} must be a mapping (an evaluation summary), got {doc!r}")
    where = str(doc.get("where") or f"point #{index}")
    x = doc.get("x")
    xv = None if x is None else _number(x, f"{where}: x")
    rewards = doc.get("rewards") or {}
    if not isinstance(rewards, Mapping):
        raise HackingInputError(f"hacking: {where}: rewards must be {{name: {{mean, std, n}}}}, got {rewards!r}")
    metrics = {str(name): _reward_estimate(stat, where, str(name)) for name, stat in rewards.items()}
    accuracy = doc.get("accuracy") or {}
    if accuracy:
        if not isinstance(accuracy, Mapping) or not isinstance(doc.get("n_judged"), Mapping):
            raise HackingInputError(
                f"hacking: {where}: accuracy needs {{category: accuracy}} and n_judged {{category: count}}"
            )
        metrics[JUDGE] = _judge_estimate(accuracy, doc["n_judged"], where)
    return EvalPoint(where, xv, metrics)


def point_from_values(
    where: str,
    x: float | None,
    rewards: Mapping[str, Sequence[float | None] | np.ndarray],
    correct: Sequence[bool | None] | None = None,
    categories: Sequence[str | None] | None = None,
) -> EvalPoint:
    """An :class:`EvalPoint` from per-image values.

    Args:
        where: the point's label; ``x`` its position (step or swept value).
        rewards: ``{name: [N] normalised values}``; ``None``/NaN (not scored) are left out of n.
        correct: ``[N]`` judge verdicts (``None`` = not judged), or ``None`` for no judge.
        categories: ``[N]`` category of each image: per-category accuracy and the mean over
            categories (as :func:`miroflow.evaluate.run_evaluate`); ``None`` pools every image.

    Raises:
        HackingInputError: a reward with no finite value, or no judged image while ``correct`` is given.
    """
    doc: dict[str, Any] = {"where": where, "x": x, "rewards": {}}
    for name, vals in rewards.items():
        arr = np.asarray([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        doc["rewards"][name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "n": int(finite.size),
        }
    if correct is not None:
        tags = list(categories) if categories is not None else ["all"] * len(correct)
        if len(tags) != len(correct):
            raise HackingInputError(f"hacking: {where}: {len(correct)} verdicts but {len(tags)} categories")
        by_tag: dict[str, list[bool]] = {}
        for ok, tag in zip(correct, tags):
            if ok is not None:
                by_tag.setdefault(str(tag), []).append(bool(ok))
        if not by_tag:
            raise HackingInputError(f"hacking: {where}: no judged image (n = 0)")
        doc["accuracy"] = {t: float(np.mean(v)) for t, v in by_tag.items()}
        doc["n_judged"] = {t: len(v) for t, v in by_tag.items()}
    return as_point(doc)


# --------------------------------------------------------------------------- the monitor
def _check_same_metrics(points: Sequence[EvalPoint]) -> list[str]:
    """The metric names every point must share (first-seen order); names a point that lacks one."""
    names: list[str] = []
    for p in points:
        names.extend(m for m in p.metrics if m not in names)
    for p in points:
        missing = [m for m in names if m not in p.metrics]
        if missing:
            have = next(q.where for q in points if missing[0] in q.metrics)
            what = "judge accuracy" if missing[0] == JUDGE else f"reward {missing[0]!r}"
            raise HackingInputError(
                f"hacking: {p.where} has no {what} ({have} has it); every point must report the same metrics"
            )
    return names


def monitor_evals(
    points: Sequence[EvalPoint | Mapping[str, Any] | Any],
    k: float = DEFAULT_K,
    min_delta: float = 0.0,
    against: Sequence[str] | None = DEFAULT_AGAINST,
) -> list[Flag]:
    """Flags between each pair of consecutive ``points`` (in the order given).

    Each point is an :class:`EvalPoint` or a plain mapping in the ``summary.json`` layout of
    :func:`miroflow.evaluate.run_evaluate` (what the study keeps per evaluated checkpoint)::

        {
          "where": "step 500",                     # optional label (default "point #<i>")
          "x": 500,                                 # optional position: step or swept value
          "rewards": {"sharpness": {"mean": 0.41, "std": 0.12, "n": 96}, ...},
          "accuracy": {"single_object": 0.9, ...},  # optional: judge accuracy per category ...
          "n_judged": {"single_object": 16, ...},   # ... and the judged images behind each
        }

    Other keys (``overall``, ``n_images``, setup) are ignored; the judge's value is the mean over
    categories (= ``overall``). An :class:`~miroflow.results.EvalSummary` works as is.

    A flag is raised for every reward ``r`` and every other metric ``q`` in ``against`` with
    ``Δr > k·SE(Δr)`` and ``−Δq > k·SE(Δq)`` (both also ``> min_delta``), ``SE(Δ) = sqrt(SE_A² + SE_B²)``.
    ``against`` names the metrics whose fall counts: :data:`JUDGE` (the default: only the judge) and/or
    reward names; ``None`` = every metric (any reward against any other). The judge in ``against`` is
    skipped when the points carry no judge (an unjudged domain then flags nothing by default).

    Raises:
        HackingInputError: ``k <= 0``, ``min_delta < 0``, a point without samples (``n = 0``), a bad
            value, a reward (or the judge) that some points report and others do not (names it), or a
            name in ``against`` that no point reports (names it and lists the metrics).
    """
    if not math.isfinite(k) or k <= 0:
        raise HackingInputError(f"hacking: k must be a finite number > 0, got {k}")
    if not math.isfinite(min_delta) or min_delta < 0:
        raise HackingInputError(f"hacking: min_delta must be >= 0, got {min_delta}")
    pts = [as_point(p, i) for i, p in enumerate(points)]
    names = _check_same_metrics(pts)
    watched = _watched(names, against) if pts else set()
    flags: list[Flag] = []
    for a, b in zip(pts, pts[1:]):
        delta = {
            m: (b.metrics[m].mean - a.metrics[m].mean, math.hypot(a.metrics[m].se, b.metrics[m].se)) for m in names
        }
        up = [m for m in names if m != JUDGE and delta[m][0] > k * delta[m][1] and delta[m][0] > min_delta]
        down = [m for m in names if m in watched and -delta[m][0] > k * delta[m][1] and -delta[m][0] > min_delta]
        for r in up:
            for q in down:
                flags.append(Flag(r, q, *delta[r], *delta[q], a.where, b.where, a.x, b.x, float(k)))
    return flags


def _watched(names: Sequence[str], against: Sequence[str] | None) -> set[str]:
    """The metrics of ``names`` whose fall counts (see :func:`monitor_evals`); names a bad entry."""
    if against is None:
        return set(names)
    if isinstance(against, str):
        raise HackingInputError(f"hacking: against must be a list of metric names, got the string {against!r}")
    unknown = [a for a in against if a not in names and a != JUDGE]
    if unknown:
        raise HackingInputError(
            f"hacking: against names {unknown[0]!r}, which no evaluation reports; metrics: {', '.join(names)}"
        )
    return {a for a in against if a in names}


def sweep_point(pt: Mapping[str, Any]) -> dict[str, Any]:
    """A ``sweep.json`` point (guidance/target) in the :func:`monitor_evals` layout.

    Raises:
        HackingInputError: the point has no ``reward_stats`` (a sweep.json older than the monitor).
    """
    name = str(pt.get("name", "?"))
    if "reward_stats" not in pt:
        raise HackingInputError(f"hacking: sweep point {name} has no reward_stats {{name: {{mean, std, n}}}}")
    return {
        "where": name,
        "x": pt.get("x"),
        "rewards": pt["reward_stats"],
        "accuracy": pt.get("accuracy") or {},
        "n_judged": pt.get("n_judged") or {},
    }


def monitor_sweep(
    points: Sequence[Mapping[str, Any]], k: float = DEFAULT_K, against: Sequence[str] | None = DEFAULT_AGAINST
) -> dict[str, list[Flag]]:
    """Flags of each sweep grid (``guidance``: ω, ``target``: the target value) along its points
    sorted by ``x``; a grid with fewer than two points has none.

    Args:
        points: ``sweep.json`` points (``kind``, ``name``, ``x``, ``reward_stats`` {name: {mean, std,
            n}}, ``accuracy`` {category: acc}, ``n_judged`` {category: n}); best-of-N points are skipped.

    Returns:
        ``{grid kind: flags}`` for every grid present.
    """
    out: dict[str, list[Flag]] = {}
    for kind in SWEEP_GRIDS:
        grid = sorted((p for p in points if p.get("kind") == kind), key=lambda p: float(p["x"]))
        if grid:
            out[kind] = monitor_evals([sweep_point(p) for p in grid], k, against=against) if len(grid) >= 2 else []
    return out


def best_of_n_points(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of a best-of-N result (:func:`miroflow.tts_stats.best_of_n`, ``tts.json``'s
    ``best_of_n``) in the :func:`monitor_evals` layout, one per N (``where`` = ``best-of-<N>``, ``x`` = N).

    The judge enters per category when the points carry ``accuracy_by_tag`` and ``n_by_tag``.

    Raises:
        HackingInputError: no ``points``, or a point without ``n`` or ``rewards``.
    """
    pts = result.get("points")
    if not isinstance(pts, Sequence) or not pts:
        raise HackingInputError("hacking: best-of-N result has no points (a tts.json older than per-N points?)")
    out = []
    for i, pt in enumerate(pts):
        if not isinstance(pt, Mapping) or "n" not in pt or "rewards" not in pt:
            raise HackingInputError(f"hacking: best-of-N point #{i} needs n and rewards {{name: {{mean, std, n}}}}")
        doc: dict[str, Any] = {"where": f"best-of-{pt['n']}", "x": pt["n"], "rewards": pt["rewards"]}
        if pt.get("accuracy_by_tag") and isinstance(pt.get("n_by_tag"), Mapping):
            doc["accuracy"], doc["n_judged"] = pt["accuracy_by_tag"], pt["n_by_tag"]
        out.append(doc)
    return out


def monitor_best_of_n(
    result: Mapping[str, Any], k: float = DEFAULT_K, against: Sequence[str] | None = DEFAULT_AGAINST
) -> list[Flag]:
    """Flags along a best-of-N result's N grid: selecting by ``select_by`` raises that reward by
    construction, so a flag here says the selection trades the judge (or a named reward) for it.

    The candidate sets are nested (best of 2 includes best of 1's candidate), so the images of two N
    are paired and the unpaired SE of :func:`monitor_evals` is conservative. The selecting reward
    itself is never a falling metric here (it cannot fall by construction).
    """
    return monitor_evals(best_of_n_points(result), k, against=against)


# --------------------------------------------------------------------------- reporting
def flag_tags(flags: Sequence[Flag], prefix: str = "hacking") -> dict[str, str]:
    """MLflow tags: ``<prefix>.flags`` (count), ``<prefix>.flagged`` (``"true"``/``"false"``) and, when
    flagged, ``<prefix>.first`` (the first flag's :meth:`Flag.text`)."""
    tags = {f"{prefix}.flags": str(len(flags)), f"{prefix}.flagged": "true" if flags else "false"}
    if flags:
        tags[f"{prefix}.first"] = flags[0].text()
    return tags


def _panel(points: Sequence[EvalPoint], flags: Sequence[Flag], title: str, xlabel: str) -> dict[str, Any]:
    """One panel of :func:`miroflow.plots.hacking_trajectories` (metrics ± SE, flagged intervals)."""
    xs = [p.x if p.x is not None else float(i) for i, p in enumerate(points)]
    names = _check_same_metrics(points) if points else []
    spans: dict[tuple[float, float], tuple[list[str], list[str]]] = {}
    for f in flags:
        x0 = f.x_start if f.x_start is not None else float(next(i for i, p in enumerate(points) if p.where == f.start))
        x1 = f.x_end if f.x_end is not None else float(next(i for i, p in enumerate(points) if p.where == f.end))
        up, down = spans.setdefault((x0, x1), ([], []))
        up.extend([f.rose] if f.rose not in up else [])
        down.extend([f.fell] if f.fell not in down else [])
    return {
        "title": title,
        "xlabel": xlabel,
        "x": xs,
        "series": {m: [p.metrics[m].mean for p in points] for m in names},
        "se": {m: [p.metrics[m].se for p in points] for m in names},
        "flagged": [(x0, x1, f"↑ {', '.join(u)}\n↓ {', '.join(d)}") for (x0, x1), (u, d) in spans.items()],
    }


def figure(
    panels: Sequence[tuple[Sequence[EvalPoint | Mapping[str, Any]], Sequence[Flag], str, str]], k: float = DEFAULT_K
) -> Figure:
    """The monitor's plot: one panel per ``(points, flags, title, xlabel)``, every metric's mean ± SE
    along the points, flagged intervals shaded red and labelled ``reward↑ metric↓``."""
    from miroflow import plots  # lazy: matplotlib costs a second to import, and only a plot needs it

    built = [_panel([as_point(p, i) for i, p in enumerate(pts)], fl, title, xl) for pts, fl, title, xl in panels]
    return plots.hacking_trajectories(built, k=k)


def sweep_figure(
    points: Sequence[Mapping[str, Any]],
    by_grid: Mapping[str, Sequence[Flag]],
    title: str,
    xlabels: Mapping[str, str],
    k: float = DEFAULT_K,
    best_of_n: Mapping[str, Any] | None = None,
) -> Figure | None:
    """The plot of :func:`monitor_sweep`'s result: one panel per grid with at least two points (sorted
    by ``x``, labelled ``xlabels[kind]``), plus the ``best_of_n`` result's panel when ``by_grid`` has
    ``"best_of_n"`` flags for it (:func:`monitor_best_of_n`); ``None`` when there is no panel."""
    panels: list[tuple[Sequence[Any], Sequence[Flag], str, str]] = []
    for kind, flags in by_grid.items():
        if kind == "best_of_n":
            if best_of_n is not None and len(best_of_n.get("points") or []) >= 2:
                pts = [as_point(p, i) for i, p in enumerate(best_of_n_points(best_of_n))]
                panels.append((pts, flags, f"{title}: best-of-N by {best_of_n.get('select_by')}", "N"))
            continue
        grid = sorted((p for p in points if p.get("kind") == kind), key=lambda p: float(p["x"]))
        if len(grid) >= 2:
            panels.append(([sweep_point(p) for p in grid], flags, f"{title}: {kind}", xlabels.get(kind, "x")))
    return figure(panels, k) if panels else None
