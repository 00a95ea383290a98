"""``miroflow compare RUN [RUN ...]``: final rewards and judge accuracy of several runs side by side.

Each ``RUN`` is an MLflow run id or a run name (the newest run of that name in
``tracking.experiment``). A training run is compared through its newest evaluation child (tag
``stage=evaluate``, as :func:`miroflow.stages.evaluate` nests it); an evaluation run through itself,
with its training run (``mlflow.parentRunId``) for the curves. The first run is the reference.

What is compared, per run:

* the table: every ``eval/reward/<name>``, ``eval/<category>`` and ``eval/overall`` metric of the
  evaluation run (the values are those metrics), each with its standard error from the
  evaluation's own per-image results — ``results.jsonl`` in the evaluation's output folder
  (``summary.json``'s ``output``), or, when that folder cannot be read from here, the per-reward
  ``std``/``n`` and per-category ``n_judged`` of the ``eval/summary.json`` artifact:

  - reward: SE = s / √n over the images with a value (s with ddof = 1);
  - category accuracy p over n judged images: binomial SE = √(p (1 − p) / n);
  - overall = mean of the K category accuracies (GenEval's convention): SE = √(Σ SE_c²) / K;

* the difference to the reference with a two-sided p-value: **Welch's two-sample t-test**
  (unequal variances) for rewards, the **two-proportion z-test** (pooled SE) for a category's
  accuracy and a **Wald z-test** (SE² of both runs summed) for ``overall``. Two samples, not paired
  (the same seeds are used by every evaluation, so a paired test would be more powerful); no
  correction for multiple comparisons. Zero variance on both sides gives p = 1 for an equal value
  and p = 0 otherwise;
* the training curves ``reward/<name>`` (MLflow metric history of the training runs) overlaid, one
  panel per reward (``curves.png``);
* the sample grids side by side (``samples.png``): the evaluation's ``grid.png``, else its logged
  ``eval/samples`` image, else the training run's last ``samples`` grid.

Written to ``out_dir`` (default ``work/compare/<sha256 of the ordered run ids, 10 hex>``):
``report.md``, ``compare.json`` (every number of the report), ``curves.png``, ``samples.png``; and,
with ``tracking.enabled``, logged as an MLflow run ``compare-<labels>`` (tag ``stage=compare``,
``compare.runs`` / ``compare.eval_runs`` / ``compare.train_runs`` = comma-separated run ids,
``compare.reference``) with those files as artifacts under ``compare/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from miroflow.compare_stats import REWARD_PREFIX as _REWARD_PREFIX
from miroflow.compare_stats import Stat, difference_p, is_category, ordered_tags, standard_errors
from miroflow.config import Params
from miroflow.errors import InputError
from miroflow.plots import new_figure, save_png
from miroflow.storage import StorageError, from_config, join_uri
from miroflow.tracking import RUN_NAME_TAG, resolve_tracking_uri, run_label, start_run

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient
    from mlflow.entities import Run

__all__ = [
    "CompareError",
    "RunData",
    "run_compare",
    "resolve_run",
    "curves_figure",
    "grids_figure",
    "default_out_dir",
]

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_FILES = ("report.md", "compare.json", "curves.png", "samples.png")


class CompareError(InputError, ValueError):
    """A run to compare cannot be found or has nothing to compare; the message names it."""


# --------------------------------------------------------------------------- MLflow
@dataclass
class RunData:
    """Everything compared about one ``RUN`` argument."""

    given: str
    label: str
    eval_run_id: str | None
    train_run_id: str | None
    eval_run_name: str | None = None
    train_run_name: str | None = None
    stats: dict[str, Stat] = field(default_factory=dict)
    se_source: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grid: np.ndarray | None = None
    grid_source: str | None = None
    output: str | None = None


def _client(params: Params) -> tuple["MlflowClient", str]:
    from mlflow import MlflowClient  # lazy: mlflow takes seconds to import

    uri = resolve_tracking_uri(params.tracking)
    return MlflowClient(tracking_uri=uri), uri


def resolve_run(client: "MlflowClient", given: str, experiment: str) -> "Run":
    """The MLflow run ``given`` names: a run id, else the newest run of ``experiment`` whose plain name (tag
    ``miroflow.run_name``, e.g. ``demo-miro``) or, failing that, MLflow name (``train-demo-miro-600steps-3f9a1c``) it is.

    Raises:
        CompareError: no such run (names the argument and the experiment).
    """
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import

    text = given.strip()
    if _RUN_ID.fullmatch(text):
        try:
            return client.get_run(text)
        except MlflowException:
            pass  # not an id after all: try it as a name
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(
            f"compare: no run {given!r}: it is not a run id and experiment {experiment!r} does not exist"
        )
    if "'" in text and '"' in text:
        raise CompareError(f"compare: run name {given!r} contains both quote characters")
    quote = '"' if "'" in text else "'"
    found: list[Run] = []
    for key in (f"tags.`{RUN_NAME_TAG}`", "attributes.run_name"):  # the plain name, then an MLflow name
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"{key} = {quote}{text}{quote}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            break
    if not found:
        raise CompareError(f"compare: no MLflow run with id or name {given!r} in experiment {experiment!r}")
    return found[0]


def _is_eval(run: "Run") -> bool:
    """An evaluation run: tagged ``stage=evaluate``, or (untagged runs) one that logged ``eval/*``. A training
    run carries its final ``eval/*`` too (:func:`miroflow.tracking.record_evaluation`): its tag decides."""
    stage = run.data.tags.get("stage")
    if stage is not None:
        return stage == "evaluate"
    return "eval/overall" in run.data.metrics or any(k.startswith(_REWARD_PREFIX) for k in run.data.metrics)


def _newest_eval_child(client: "MlflowClient", run: "Run") -> "Run | None":
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _download_json(client: "MlflowClient", run_id: str, path: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        return dict(json.loads(Path(local).read_text(encoding="utf-8")))


def _last_image(client: "MlflowClient", run_id: str, key: str) -> np.ndarray | None:
    """The newest frame of the image series ``key`` logged with ``log_image`` (``images/<key>+step+N+...png``)."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import

    prefix = key.replace("/", "~") + "+step+"
    try:
        files = [a.path for a in client.list_artifacts(run_id, "images")]
    except MlflowException:
        return None
    frames = []
    for p in files:
        name = p.rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".png"):
            step = name[len(prefix) :].split("+", 1)[0]
            if step.isdigit():
                frames.append((int(step), p))
    if not frames:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, max(frames)[1], tmp)
        return np.asarray(Image.open(local).convert("RGB"))


def _read_results(params: Params, output: str | None) -> tuple[list[dict[str, Any]] | None, np.ndarray | None]:
    """``results.jsonl`` rows and ``grid.png`` of an evaluation output folder (``None`` for what cannot be read)."""
    if not output:
        return None, None
    st = from_config(params.storage)
    rows: list[dict[str, Any]] | None = None
    grid: np.ndarray | None = None
    try:
        text = st.read_bytes(join_uri(output, "results.jsonl")).decode("utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (StorageError, OSError, ValueError) as err:
        log.info("compare: cannot read results.jsonl under %s (%s); SEs from summary.json", output, err)
    try:
        grid = np.asarray(Image.open(io.BytesIO(st.read_bytes(join_uri(output, "grid.png")))).convert("RGB"))
    except (StorageError, OSError, ValueError):
        grid = None
    return rows, grid


def _collect(client: "MlflowClient", params: Params, given: str, run: "Run") -> RunData:
    if _is_eval(run):
        ev: Run | None = run
        parent = run.data.tags.get("mlflow.parentRunId")
        train = client.get_run(parent) if parent else None
    else:
        train, ev = run, _newest_eval_child(client, run)
    data = RunData(
        given=given,
        label=run_label(train or run),
        eval_run_id=ev.info.run_id if ev else None,
        train_run_id=train.info.run_id if train else None,
        eval_run_name=run_label(ev) if ev else None,
        train_run_name=run_label(train) if train else None,
    )
    if ev is not None:
        metrics = {k: float(v) for k, v in ev.data.metrics.items() if k.startswith("eval/")}
        summary = _download_json(client, ev.info.run_id, "eval/summary.json") or {}
        data.output = summary.get("output") or ev.data.tags.get("eval.output")
        rows, grid = _read_results(params, data.output)
        data.stats, data.se_source = standard_errors(rows, summary, metrics)
        if grid is not None:
            data.grid, data.grid_source = grid, f"{data.output}/grid.png"
        else:
            img = _last_image(client, ev.info.run_id, "eval/samples")
            if img is not None:
                data.grid, data.grid_source = img, f"run {ev.info.run_id} image eval/samples"
    if train is not None:
        for key in sorted(k for k in train.data.metrics if k.startswith("reward/")):
            last: dict[int, tuple[int, float]] = {}  # step -> (timestamp, value): a resumed run's rerun wins
            for m in client.get_metric_history(train.info.run_id, key):
                if int(m.step) not in last or m.timestamp >= last[int(m.step)][0]:
                    last[int(m.step)] = (int(m.timestamp), float(m.value))
            data.curves[key] = [(step, v) for step, (_, v) in sorted(last.items())]
        if data.grid is None:
            img = _last_image(client, train.info.run_id, "samples")
            if img is not None:
                data.grid, data.grid_source = img, f"run {train.info.run_id} image samples (last step)"
    if not data.stats and not data.curves:
        raise CompareError(
            f"compare: run {given!r} ({run.info.run_id}) has neither an evaluation (eval/... metrics) "
            "nor reward/<name> training curves"
        )
    return data


# --------------------------------------------------------------------------- figures
def curves_figure(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> Figure:
    """Training curves overlaid: one panel per metric (union over runs), one line per run.

    Args:
        curves: ``{run label: {metric: [(step, value), ...]}}``.

    Raises:
        ValueError: no metric in any run.
    """
    keys = sorted({k for c in curves.values() for k in c})
    if not keys:
        raise ValueError("curves_figure: no curves to draw")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = new_figure(3.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for label, c in curves.items():
            pts = c.get(key) or []
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def grids_figure(grids: Mapping[str, np.ndarray]) -> Figure:
    """Sample grids side by side, one panel per run, titled with its label.

    Args:
        grids: ``{run label: uint8 [H, W, 3]}`` (sizes may differ).

    Raises:
        ValueError: no grids.
    """
    if not grids:
        raise ValueError("grids_figure: no sample grids to draw")
    fig = new_figure(3.2 * len(grids), 3.6)
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (label, img) in zip(axes, grids.items()):
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the report
def default_out_dir(run_ids: Sequence[str]) -> Path:
    """``work/compare/<first 10 hex of sha256 of the ordered run ids>``."""
    digest = hashlib.sha256("|".join(run_ids).encode()).hexdigest()[:10]
    return Path("work") / "compare" / digest


def _unique_labels(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label}#{seen[r.label]}"


def _keys(runs: list[RunData]) -> list[str]:
    keys = list(dict.fromkeys(k for r in runs for k in r.stats))
    rewards = [k for k in keys if k.startswith(_REWARD_PREFIX)]
    cats = ["eval/" + t for t in ordered_tags(k[5:] for k in keys if is_category(k))]
    return rewards + cats + (["eval/overall"] if "eval/overall" in keys else [])


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _table(runs: list[RunData], keys: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown table lines and the same numbers as dicts (for ``compare.json``)."""
    ref = runs[0]
    head = "| metric | " + " | ".join(f"{r.label} (mean ± SE)" for r in runs)
    head += "".join(f" | Δ {r.label} − {ref.label} | p" for r in runs[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + len(runs) + 2 * (len(runs) - 1))]
    doc: list[dict[str, Any]] = []
    for key in keys:
        cells = [key]
        entry: dict[str, Any] = {"metric": key, "runs": {}, "differences": {}}
        for r in runs:
            s = r.stats.get(key)
            cells.append("n/a" if s is None else f"{_fmt(s.value)} ± {_fmt(s.se)} (n={s.n})")
            entry["runs"][r.label] = None if s is None else {"value": s.value, "se": _nan_none(s.se), "n": s.n}
        for r in runs[1:]:
            a, b = ref.stats.get(key), r.stats.get(key)
            if a is None or b is None:
                cells += ["n/a", "n/a"]
                entry["differences"][r.label] = None
                continue
            p, test = difference_p(key, a, b)
            cells += [f"{b.value - a.value:+.4f}", _fmt(p)]
            entry["differences"][r.label] = {"delta": b.value - a.value, "p": _nan_none(p), "test": test}
        lines.append("| " + " | ".join(cells) + " |")
        doc.append(entry)
    return lines, doc


def _nan_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _report(runs: list[RunData], keys: list[str], table: list[str], figures: dict[str, str]) -> str:
    ref = runs[0]
    out = ["# Run comparison", "", f"Reference: **{ref.label}** (the first run). Runs:", ""]
    out += ["| label | given | training run | evaluation run | SEs from | samples from |", "|---|---|---|---|---|---|"]
    for r in runs:
        out.append(
            f"| {r.label} | `{r.given}` | {r.train_run_name or 'n/a'} `{r.train_run_id or ''}` | "
            f"{r.eval_run_name or 'n/a'} `{r.eval_run_id or ''}` | {r.se_source or 'n/a'} | {r.grid_source or 'n/a'} |"
        )
    out += ["", "## Final evaluation", ""]
    if keys:
        out += table
        out += [
            "",
            "Values are the evaluation runs' MLflow metrics; n = images (judged images for accuracies). "
            "SE: s/√n for rewards (s with ddof = 1), √(p(1−p)/n) for a category's accuracy, √(Σ SE_c²)/K for "
            "overall (the mean of K categories). p: two-sided, against the reference — Welch's two-sample t-test "
            "(rewards), two-proportion z-test with pooled SE (categories), Wald z-test (overall); not paired, no "
            "multiple-comparison correction.",
        ]
    else:
        out.append("No run has an evaluation.")
    out += ["", "## Training curves", ""]
    out.append(f"![reward curves]({figures['curves']})" if "curves" in figures else "No training curves.")
    out += ["", "## Samples", ""]
    out.append(f"![sample grids]({figures['samples']})" if "samples" in figures else "No sample grids.")
    return "\n".join(out) + "\n"


def run_compare(params: Params, runs: Sequence[str], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare ``runs`` (ids or names; the first is the reference) and write the report (module docstring).

    Args:
        params: ``tracking`` (where the runs are, where the comparison run goes) and ``storage``
            (to read the evaluation output folders).
        runs: at least one run id or name.
        out_dir: report folder; default :func:`default_out_dir` of the resolved run ids.

    Returns:
        The ``compare.json`` document: ``runs`` (label, given, ids), ``table`` (per metric: each run's
        value/se/n and each difference's delta/p/test), ``files`` (paths), ``mlflow_run_id`` (None when
        tracking is off).

    Raises:
        CompareError: no runs, an unknown run (names it), or a run with nothing to compare.
    """
    if not runs:
        raise CompareError("compare: give at least one MLflow run id or name")
    client, uri = _client(params)
    resolved = [resolve_run(client, g, params.tracking.experiment) for g in runs]  # every name first: fail fast
    data = [_collect(client, params, g, run) for g, run in zip(runs, resolved)]
    _unique_labels(data)
    ids = [d.eval_run_id or d.train_run_id or "" for d in data]
    out = Path(out_dir) if out_dir is not None else default_out_dir(ids)
    out.mkdir(parents=True, exist_ok=True)
    for stale in _FILES:  # a rerun into the same folder never keeps (or uploads) an old figure
        (out / stale).unlink(missing_ok=True)
    figures: dict[str, str] = {}
    curves = {d.label: d.curves for d in data if d.curves}
    if curves:
        save_png(curves_figure(curves), out / "curves.png")
        figures["curves"] = "curves.png"
    grids = {d.label: d.grid for d in data if d.grid is not None}
    if grids:
        save_png(grids_figure(grids), out / "samples.png")
        figures["samples"] = "samples.png"
    keys = _keys(data)
    table, rows = _table(data, keys)
    (out / "report.md").write_text(_report(data, keys, table, figures), encoding="utf-8")
    doc: dict[str, Any] = {
        "reference": data[0].label,
        "runs": [
            {
                "label": d.label,
                "given": d.given,
                "eval_run_id": d.eval_run_id,
                "train_run_id": d.train_run_id,
                "se_source": d.se_source,
                "grid_source": d.grid_source,
                "output": d.output,
            }
            for d in data
        ],
        "table": rows,
        "files": {"report": str(out / "report.md"), **{k: str(out / v) for k, v in figures.items()}},
        "tracking_uri": uri,
        "mlflow_run_id": None,
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if params.tracking.enabled:
        tags = {
            "stage": "compare",
            "compare.runs": ",".join(ids),
            "compare.eval_runs": ",".join(d.eval_run_id or "" for d in data),
            "compare.train_runs": ",".join(d.train_run_id or "" for d in data),
            "compare.reference": ids[0],
        }
        name = ("compare-" + "-vs-".join(d.label for d in data))[:240]
        with start_run(params, run_name=name, tags=tags) as tracker:
            doc["mlflow_run_id"] = tracker.run_id
            (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            tracker.log_artifact(out, "compare")
    return doc
