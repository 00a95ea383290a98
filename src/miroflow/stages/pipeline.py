"""The whole pipeline on one machine: the data stages, then MIRO and its baseline (the demo).

``miroflow demo`` is :func:`demo`: every stage on the embedded defaults with the run set of
:func:`miroflow.recipes.pipeline_runs`, printing where each output went as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miroflow.compare import run_compare
from miroflow.config import Params
from miroflow.recipes import derive, miro_of, pipeline_runs, sized, with_manifests
from miroflow.results import (
    BinResult,
    EmbedResult,
    EvalSummary,
    PrepareResult,
    Result,
    ScoreResult,
    SweepResult,
    TrainResult,
)
from miroflow.stages.data import bin_scores, embed, prepare, score
from miroflow.stages.evaluate import evaluate, sweep
from miroflow.stages.train import train
from miroflow.storage import Storage
from miroflow.tracking import pipeline_run

__all__ = ["DEMO_MANIFESTS", "DataResult", "DemoResult", "data_stages", "demo"]

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DataResult(Result):
    """prepare → score → bin → embed."""

    prepare: PrepareResult
    score: ScoreResult
    bins: BinResult
    embed: EmbedResult

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {
            "prepare": PrepareResult.from_dict(d["prepare"]),
            "score": ScoreResult.from_dict(d["score"]),
            "bins": BinResult.from_dict(d["bins"]),
            "embed": EmbedResult.from_dict(d["embed"]),
        }


@dataclass(frozen=True)
class DemoResult(Result):
    """Everything :func:`demo` produced (baseline first, then MIRO)."""

    data: DataResult
    runs: tuple[TrainResult, ...]
    evals: tuple[EvalSummary, ...]
    sweep: SweepResult
    compare: str | None = None  # report.md of `miroflow compare` baseline vs MIRO (None when untracked)

    @classmethod
    def _convert(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {
            "data": DataResult.from_dict(d["data"]),
            "runs": tuple(TrainResult.from_dict(r) for r in d["runs"]),
            "evals": tuple(EvalSummary.from_dict(e) for e in d["evals"]),
            "sweep": SweepResult.from_dict(d["sweep"]),
            "compare": d.get("compare"),
        }


def _quiet(_: str) -> None:
    """An :data:`Echo` that prints nothing."""


def data_stages(params: Params, storage: Storage | None = None, echo: Echo = _quiet) -> DataResult:
    """prepare, score, bin and embed (each idempotent: finished shards and tables are not redone)."""
    pr = prepare(params, storage)
    echo(f"[prepare] {pr.num_samples} samples, {len(pr.shards)} shards -> {pr.root}")
    echo(f"[prepare] manifest -> {pr.manifest}")
    sc = score(params, storage)
    echo(f"[score] {sc.num_rows} rows in {sc.num_tables} tables; manifest -> {sc.manifest}")
    bi = bin_scores(params, storage)
    echo(f"[bin] {bi.num_bins} bins for {', '.join(bi.names)} -> {bi.path}")
    em = embed(params, storage)
    echo(f"[embed] {em.sidecars} sidecars; manifest -> {em.manifest}")
    return DataResult(prepare=pr, score=sc, bins=bi, embed=em)


#: Where the demo keeps its local manifests (not ``manifests/``, which ``dvc repro`` tracks).
DEMO_MANIFESTS = "work/demo/manifests"


def demo(params: Params, steps: int = 600, echo: Echo = _quiet, manifests: str | None = DEMO_MANIFESTS) -> DemoResult:
    """The demo: data stages, a tiny baseline and MIRO model (``steps`` each, resumable), their
    evaluation, a small sweep of the MIRO model (ω, the sweep target, best-of-N) and, when tracked, the
    ``miroflow compare`` report of the two runs (``<manifests>/../compare``, docs/compare.md).

    Its manifests go to ``manifests`` (default :data:`DEMO_MANIFESTS`; ``None`` keeps the params'
    own paths); object-store outputs share ``storage.root`` safely (content-addressed keys).
    Tracked as one parent MLflow run ``demo-<steps>steps-<6 hex>`` (tag ``stage=pipeline``) with the
    training runs as its children (evaluations and the sweep nest under their training run)."""
    if manifests is not None:
        params = with_manifests(params, manifests)
    with pipeline_run(sized(params, steps), "demo") as parent:  # logs the train section the demo runs
        if parent is not None:
            echo(f"[demo] MLflow parent run {parent}")
            params = derive(params, tracking={"parent_run_id": parent})  # execution-only: no output moves
        compare_dir = str(Path(manifests).parent / "compare") if manifests is not None else None
        return _demo(params, steps, echo, compare_dir)


def _demo(params: Params, steps: int, echo: Echo, compare_dir: str | None = None) -> DemoResult:
    """:func:`demo`'s stages with ``params`` as given (manifests and parent run already set)."""
    data = data_stages(params, echo=echo)
    miro, base = pipeline_runs(sized(miro_of(params), steps), miro_name="demo-miro", baseline_name="demo-baseline")
    runs, evals = [], []
    for p in (base, miro):
        out = train(p, resume=True)
        echo(
            f"[train] {p.train.run_name}: {out.steps} steps, loss {out.loss:.4f} -> {out.checkpoint} "
            f"(MLflow run {out.mlflow_run_id})"
        )
        summary = evaluate(p)
        overall = f"{summary.overall:.3f}" if summary.overall is not None else "n/a"
        echo(f"[evaluate] {p.train.run_name}: judge accuracy {overall} -> {summary.output}")
        runs.append(out)
        evals.append(summary)
    echo("[demo] reward means (baseline vs MIRO):")
    b_means, m_means = evals[0].reward_means(), evals[1].reward_means()
    for r, m in m_means.items():
        echo(f"    {r:18s} {_fmt(b_means.get(r))}  {_fmt(m)}")
    sp = derive(  # the MIRO run's own params: its checkpoint folder is addressed by them
        miro,
        eval={"num_prompts": 12, "images_per_prompt": 2, "steps": 20},
        sweep={"guidance_scales": [0, 0.5], "target_values": [0, 0.5, 1], "best_of_n": [1, 2, 4]},
    )
    sw = sweep(sp)
    echo(f"[sweep] demo-miro: {len(sw.points)} points (ω, {sp.sweep.target_reward} target, best-of-N) -> {sw.output}")
    report = None
    ids = [r.mlflow_run_id for r in runs]
    if all(ids):
        cmp = run_compare(params, [i for i in ids if i], out_dir=compare_dir)
        report = str(cmp["files"]["report"])
        echo(f"[compare] demo-baseline vs demo-miro (SEs, p-values, curves, grids) -> {report}")
    return DemoResult(data=data, runs=tuple(runs), evals=tuple(evals), sweep=sw, compare=report)


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"
