"""Typer CLI: one command per pipeline stage.

Every stage command accepts ``--params FILE`` (default ``params.yaml``) and DVC-style
overrides ``-S section.key=value`` (repeatable).

Error boundary (docs/architecture.md, "Errors"): an exception from any command prints one line,
``error: <message naming the field, file, URI, shard or key>``, and exits 2 for bad input or 1 for
an operational failure; ``miroflow --debug <command>`` (or ``MIROFLOW_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from miroflow.config import Params, ParamsError, load_params
from miroflow.errors import MiroflowError, describe
from miroflow.serve import ServeOptions, parse_pools
from miroflow.serve import serve as run_serve


class _LazyModule:
    """Module ``name``, imported on first attribute access (the stage libraries import torch, diffusers
    and open_clip: seconds of CPU that ``miroflow --help`` and ``miroflow serve`` must not wait for).

    A plain proxy, never put in ``sys.modules``: a lazy module object there is touched by
    ``inspect.getmodule`` while torch imports (``hasattr(module, "__file__")``), which would run the
    stage libraries' imports in the middle of torch's own and fail as a circular import."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def _lazy_function(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when first called."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


if TYPE_CHECKING:
    from miroflow import launch, stages
    from miroflow.compare import run_compare
    from miroflow.study import run_study
    from miroflow.tune_report import brief_lines
    from miroflow.tune_stage import tune_targets as run_tune_targets
else:
    stages = _LazyModule("miroflow.stages")
    launch = _LazyModule("miroflow.launch")
    run_compare = _lazy_function("miroflow.compare", "run_compare")
    run_study = _lazy_function("miroflow.study", "run_study")
    brief_lines = _lazy_function("miroflow.tune_report", "brief_lines")
    run_tune_targets = _lazy_function("miroflow.tune_stage", "tune_targets")

#: ``miroflow demo --manifests`` default (miroflow.stages.DEMO_MANIFESTS, a test checks they agree).
DEMO_MANIFESTS = "work/demo/manifests"

#: Most lines a params error prints on a stage command (``params validate`` prints them all).
MAX_PROBLEM_LINES = 3


def _close_progress_bars() -> None:
    """Close progress bars an error left open, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class _ErrorBoundary(TyperGroup):
    """The top-level group: turns any exception a command raises into one line and an exit status."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context (not public API)
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer.Exit, Ctrl-C and usage errors keep click's handling
        except Exception as exc:
            if ctx.meta.get("miroflow.debug"):
                raise
            _close_progress_bars()
            if isinstance(exc, ParamsError):  # incl. PreflightError: one line per problem, at most 3
                _echo_params_error(exc)
                raise typer.Exit(code=2) from None
            code, line = describe(exc)
            typer.echo(f"error: {line}", err=True)
            if not isinstance(exc, MiroflowError):
                typer.echo("(rerun with --debug or MIROFLOW_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(code=code) from None


app = typer.Typer(
    cls=_ErrorBoundary,
    add_completion=False,
    no_args_is_help=True,
    help="miroflow: MIRO multi-reward flow-matching pipeline.",
    pretty_exceptions_show_locals=False,  # --debug tracebacks must not print locals (secrets)
)
params_app = typer.Typer(no_args_is_help=True, help="Inspect and validate params.yaml.")
app.add_typer(params_app, name="params")

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to load.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a param: -S train.lr=1e-3 (repeatable).")
]


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MIROFLOW_DEBUG", help="Show the traceback of an error.")
    ] = False,
) -> None:
    """miroflow: MIRO multi-reward flow-matching pipeline."""
    ctx.meta["miroflow.debug"] = debug


def _echo_params_error(err: ParamsError) -> None:
    """At most :data:`MAX_PROBLEM_LINES` lines, each naming the source and the dotted key."""
    problems = err.problems
    if len(problems) > MAX_PROBLEM_LINES:
        more = len(problems) - (MAX_PROBLEM_LINES - 1)
        problems = [*problems[: MAX_PROBLEM_LINES - 1], f"... and {more} more (miroflow params validate lists all)"]
    for line in problems:
        typer.echo(f"{err.source}: {line}", err=True)


def _load(params_file: Path, overrides: list[str] | None) -> Params:
    try:
        return load_params(params_file, overrides or [])
    except ParamsError as err:
        _echo_params_error(err)
        raise typer.Exit(code=2) from None


@params_app.command("validate")
def params_validate(
    file: Annotated[Path, typer.Option("--file", "-f", help="File to validate.")] = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Validate a params file: types and ranges, then the semantic checks every stage runs first
    (reward, model, encoder and prompt-set names, targets in [0, 1], domain/URI). One line per
    problem naming the dotted key; exit 1 if any."""
    if not file.exists():
        typer.echo(f"{file}: file not found", err=True)
        raise typer.Exit(code=2)
    try:
        params = load_params(file, overrides or [])
    except ParamsError as err:
        for line in err.problems:
            typer.echo(line)
        raise typer.Exit(code=1) from None
    problems = stages.check_params(params)
    for line in problems:
        typer.echo(line)
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"{file}: ok")


@params_app.command("show")
def params_show(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Print the effective params (file + overrides + defaults) as JSON."""
    params = _load(params_file, overrides)
    typer.echo(json.dumps(params.model_dump(mode="json"), indent=2))


@app.command()
def prepare(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage prepare: render/import the dataset into webdataset shards + a local manifest."""
    r = stages.prepare(_load(params_file, overrides))
    typer.echo(f"prepared {r.num_samples} samples in {len(r.shards)} shards under {r.root}; manifest: {r.manifest}")


@app.command()
def score(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage score: score every shard with score.rewards; one table per shard (resumable)."""
    r = stages.score(_load(params_file, overrides))
    typer.echo(f"scored {r.num_tables} shards, {r.num_rows} rows; manifest: {r.manifest}")


@app.command("bin")
def bin_(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage bin: 64 quantile bins per reward from the score tables (versioned JSON)."""
    r = stages.bin_scores(_load(params_file, overrides))
    typer.echo(f"bins for {', '.join(r.names)} (hash {r.hash[:12]}); saved to {r.path}")


@app.command()
def embed(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage embed: precompute text embeddings (and VAE latents) as shard sidecars."""
    r = stages.embed(_load(params_file, overrides))
    typer.echo(f"embedded {r.sidecars} shards; manifest: {r.manifest}")


@app.command()
def train(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue exactly from the latest complete checkpoint.")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after this many steps (for smoke runs).")
    ] = None,
    result: Annotated[
        Path | None, typer.Option("--result", help="Also write the TrainResult as JSON to this file (rank 0).")
    ] = None,
    log_metrics: Annotated[
        bool, typer.Option("--log-metrics", help="Print the metric lines (loss every train.log_every steps) to stderr.")
    ] = False,
) -> None:
    """Stage train: MIRO (or baseline with -S train.rewards=[]) flow matching; MLflow-tracked.

    With -S train.nproc_per_node=N (N > 1) or train.nnodes > 1 it launches torchrun (docs/control-room.md)."""
    with launch.metrics_to_stderr(log_metrics):
        r = launch.train(
            _load(params_file, overrides),
            resume=resume,
            max_steps=max_steps,
            echo=lambda line: typer.echo(line, err=True),
        )
    if result is not None and stages.is_main_process():
        result.write_text(r.to_json(), encoding="utf-8")
    if stages.is_main_process():
        typer.echo(f"trained {r.steps} steps (loss {r.loss:.4f}) -> {r.checkpoint}; manifest: {r.manifest}")


@app.command()
def evaluate(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    out: Annotated[
        str | None, typer.Option("--out", help="Output URI (default <storage.root>/<eval.output>/<run>-<hash>).")
    ] = None,
) -> None:
    """Stage evaluate: generate on a prompt set in GenEval's layout, judge + score, summary.json."""
    r = stages.evaluate(_load(params_file, overrides), out_uri=out)
    brief = {
        "overall": r.overall,
        "accuracy": r.accuracy,
        "rewards": {k: v.to_dict() for k, v in r.rewards.items()},
        "output": r.output,
    }
    typer.echo(json.dumps(brief, indent=2))


@app.command()
def sweep(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage sweep: ω grid, one reward's target grid and best-of-N; MLflow parent + child runs, plots."""
    r = stages.sweep(_load(params_file, overrides))
    typer.echo(f"sweep: {len(r.points)} points -> {r.output}; manifest: {r.manifest}")


@app.command()
def tts(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Best-of-N test-time scaling: select by sweep.select_by, report every reward for N in sweep.best_of_n."""
    r = stages.tts(_load(params_file, overrides))
    typer.echo(json.dumps({"select_by": r.select_by, "ns": list(r.ns), "output": r.output}, indent=2))


@app.command()
def study(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test size (mechanics only, ~10 min).")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where results.md and figures/ go (default: docs, or work/study/quick with --quick)."
        ),
    ] = None,
    study_file: Annotated[Path, typer.Option("--study", help="Study settings (runs, sizes, grids).")] = Path(
        "study.yaml"
    ),
) -> None:
    """The MIRO-vs-baseline study in miniature: data, scores, 7 trainings, curves, TTS, sweeps, report.

    The study is validated first: one that cannot run is refused (exit 2) before any work."""
    params = _load(params_file, overrides)
    out_dir = out or (Path("work/study/quick") if quick else Path("docs"))
    try:
        doc = run_study(params, size="quick" if quick else "default", out_dir=out_dir, study_config=study_file)
    except ParamsError as err:
        _echo_params_error(err)
        raise typer.Exit(code=2) from None
    typer.echo(f"study written to {doc['results']}")


@app.command()
def demo(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per demo model.")] = 600,
    manifests: Annotated[
        str, typer.Option("--manifests", help="Folder of the demo's local manifests (not DVC's manifests/).")
    ] = DEMO_MANIFESTS,
) -> None:
    """Run every stage on the embedded defaults (shapes): data, scores, bins, a tiny baseline and a
    tiny MIRO model, their evaluation and a small sweep. Prints where each output went."""
    stages.demo(_load(params_file, overrides), steps=steps, echo=typer.echo, manifests=manifests)
    typer.echo("[demo] browse runs: mlflow ui --backend-store-uri sqlite:///work/mlflow.db")


@app.command("tune-targets")
def tune_targets(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    trials: Annotated[
        int | None,
        typer.Option("--trials", min=1, help="Trial budget of the study (tune.trials); a rerun adds the missing ones."),
    ] = None,
) -> None:
    """Search the reward-target vector (and ω) for tune.objective with Optuna; re-evaluate the best and the
    all-ones default on held-out prompts and seeds (docs/tune.md). MLflow parent + one child per trial."""
    extra = [f"tune.trials={trials}"] if trials is not None else []
    r = run_tune_targets(_load(params_file, [*(overrides or []), *extra]))
    for line in brief_lines(r.to_dict()):
        typer.echo(line)


@app.command()
def compare(
    runs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN",
            help="MLflow run ids or names (newest run of that name in tracking.experiment); first = reference.",
        ),
    ],
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default work/compare/<hash of the run ids>).")
    ] = None,
) -> None:
    """Compare runs: final rewards and judge accuracy per category with SEs and p-values against the first run,
    reward curves overlaid, sample grids side by side (docs/compare.md); markdown + PNGs, logged as an MLflow run."""
    r = run_compare(_load(params_file, overrides), runs, out_dir=out)
    typer.echo(f"compared {len(r['runs'])} runs -> {r['files']['report']} (MLflow run {r['mlflow_run_id']})")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address the Prefect server binds.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option("--port", help="The server's port; default 4200, or a free port if 4200 is taken.")
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            help="Use this Prefect API (http://host:port/api) instead of starting a server "
            "(default: PREFECT_API_URL when it answers).",
        ),
    ] = None,
    pools: Annotated[str, typer.Option("--pools", help="Work pools to start a process worker for.")] = "cpu,gpu",
    work_dir: Annotated[
        Path, typer.Option("--work-dir", help="PREFECT_HOME (database, flow results) and logs/ of every process.")
    ] = Path("work/prefect"),
    startup_timeout: Annotated[
        float, typer.Option("--startup-timeout", min=1, help="Seconds to wait for each start-up step.")
    ] = 180.0,
) -> None:
    """The control room on this machine: a Prefect server (API + UI), the process work pools cpu and gpu
    with every deployment registered on them, and one worker per pool; flow runs work in the current
    directory. Prints "miroflow serve: ready" and the UI URL; Ctrl-C stops everything (docs/control-room.md)."""
    opts = ServeOptions(
        host=host,
        port=port,
        api_url=api_url,
        pools=parse_pools(pools),
        work_dir=work_dir,
        startup_timeout_s=startup_timeout,
    )
    raise typer.Exit(code=run_serve(opts, echo=lambda line: typer.echo(line, err=False)))


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
