"""Typer CLI: one command per pipeline stage.

Every stage command accepts ``--params FILE`` (default ``params.yaml``) and DVC-style
overrides ``-S section.key=value`` (repeatable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from miroflow.config import Params, ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help="miroflow: MIRO multi-reward flow-matching pipeline.")
params_app = typer.Typer(no_args_is_help=True, help="Inspect and validate params.yaml.")
app.add_typer(params_app, name="params")

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to load.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-S", help="Override a param: -S train.lr=1e-3 (repeatable).")]


def _load(params_file: Path, overrides: list[str] | None) -> Params:
    try:
        return load_params(params_file, overrides or [])
    except ParamsError as err:
        for line in err.problems:
            typer.echo(f"{err.source}: {line}", err=True)
        raise typer.Exit(code=2) from None


@params_app.command("validate")
def params_validate(
    file: Annotated[Path, typer.Option("--file", "-f", help="File to validate.")] = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Validate a params file; print one line per problem naming the dotted key."""
    if not file.exists():
        typer.echo(f"{file}: file not found", err=True)
        raise typer.Exit(code=2)
    try:
        load_params(file, overrides or [])
    except ParamsError as err:
        for line in err.problems:
            typer.echo(line)
        raise typer.Exit(code=1) from None
    typer.echo(f"{file}: ok")


@params_app.command("show")
def params_show(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Print the effective params (file + overrides + defaults) as JSON."""
    params = _load(params_file, overrides)
    typer.echo(json.dumps(params.model_dump(mode="json"), indent=2))


@app.command()
def prepare(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage prepare: render/import the dataset into webdataset shards + a local manifest."""
    from miroflow.prepare import run_prepare

    params = _load(params_file, overrides)
    manifest = run_prepare(params)
    typer.echo(
        f"prepared {manifest['num_samples']} samples in {len(manifest['shards'])} shards under {manifest['root']}; "
        f"manifest: {params.data.manifest}"
    )


@app.command()
def score(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage score: score every shard with score.rewards; one table per shard (resumable)."""
    from miroflow.score import run_score

    params = _load(params_file, overrides)
    m = run_score(params)
    typer.echo(f"scored {len(m['tables'])} shards, {m['num_rows']} rows; manifest: {params.score.manifest}")


@app.command("bin")
def bin_(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage bin: 64 quantile bins per reward from the score tables (versioned JSON)."""
    from miroflow.score import run_bin

    params = _load(params_file, overrides)
    b = run_bin(params)
    typer.echo(f"bins for {', '.join(b.names)} (hash {b.hash[:12]}); saved to {params.score.bins}")


@app.command()
def embed(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage embed: precompute text embeddings (and VAE latents) as shard sidecars."""
    from miroflow.embed import embeds_manifest_path, run_embed

    params = _load(params_file, overrides)
    m = run_embed(params)
    typer.echo(f"embedded {len(m['sidecars'])} shards; manifest: {embeds_manifest_path(params)}")


@app.command()
def train(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from the latest complete checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps (for smoke runs).")] = None,
) -> None:
    """Stage train: MIRO (or baseline with -S train.rewards=[]) flow matching; MLflow-tracked."""
    from miroflow.stages import TRAIN_MANIFEST, train_stage

    params = _load(params_file, overrides)
    out = train_stage(params, resume=resume, max_steps=max_steps)
    typer.echo(f"trained {out['steps']} steps (loss {out['loss']:.4f}) -> {out['checkpoint']}; manifest: {TRAIN_MANIFEST}")


@app.command()
def evaluate(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="Output URI (default <storage.root>/<eval.output>/<run>).")] = None,
) -> None:
    """Stage evaluate: generate on a prompt set in GenEval's layout, judge + score, summary.json."""
    from miroflow.stages import evaluate_stage

    params = _load(params_file, overrides)
    summary = evaluate_stage(params, out_uri=out)
    typer.echo(json.dumps({k: summary[k] for k in ("overall", "accuracy", "rewards", "output") if k in summary}, indent=2, default=str))


@app.command()
def sweep(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Stage sweep: ω grid, one reward's target grid and best-of-N; MLflow parent + child runs, plots."""
    from miroflow.stages import sweep_stage

    params = _load(params_file, overrides)
    doc = sweep_stage(params)
    typer.echo(f"sweep: {len(doc.get('points', []))} points -> {doc.get('output')}; manifest: manifests/sweep.json")


@app.command()
def tts(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Best-of-N test-time scaling: select by sweep.select_by, report every reward for N in sweep.best_of_n."""
    from miroflow.stages import tts_stage

    params = _load(params_file, overrides)
    res = tts_stage(params)
    typer.echo(json.dumps({k: res[k] for k in ("select_by", "ns", "output") if k in res}, indent=2, default=str))


@app.command()
def study(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test size (mechanics only, ~10 min).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Where results.md and figures/ go (default: docs, or work/study/quick with --quick).")] = None,
    study_file: Annotated[Path, typer.Option("--study", help="Study settings (runs, sizes, grids).")] = Path("study.yaml"),
) -> None:
    """The MIRO-vs-baseline study in miniature: data, scores, 7 trainings, curves, TTS, sweeps, report."""
    from miroflow.study import run_study

    params = _load(params_file, overrides)
    out_dir = out or (Path("work/study/quick") if quick else Path("docs"))
    doc = run_study(params, size="quick" if quick else "default", out_dir=out_dir, study_config=study_file)
    typer.echo(f"study written to {doc.get('results', out_dir / 'results.md')}")


@app.command()
def demo(
    params_file: ParamsFile = Path("params.yaml"),
    overrides: SetOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per demo model.")] = 600,
) -> None:
    """Run every stage on the embedded defaults (shapes): data, scores, bins, a tiny baseline and a
    tiny MIRO model, and their evaluation. Prints where each output went."""
    from miroflow.config import apply_overrides
    from miroflow.embed import embeds_manifest_path, run_embed
    from miroflow.prepare import run_prepare
    from miroflow.score import run_bin, run_score
    from miroflow.stages import evaluate_stage, train_stage

    params = _load(params_file, overrides)
    manifest = run_prepare(params)
    typer.echo(f"[prepare] {manifest['num_samples']} samples, {len(manifest['shards'])} shards -> {manifest['root']}")
    typer.echo(f"[prepare] manifest -> {params.data.manifest}")
    scores = run_score(params)
    typer.echo(f"[score] {scores['num_rows']} rows in {len(scores['tables'])} tables; manifest -> {params.score.manifest}")
    bins = run_bin(params)
    typer.echo(f"[bin] {bins.num_bins} bins for {', '.join(bins.names)} -> {params.score.bins}")
    embeds = run_embed(params)
    typer.echo(f"[embed] {len(embeds['sidecars'])} sidecars; manifest -> {embeds_manifest_path(params)}")
    summaries = {}
    for name, rewards in (("demo-baseline", "[]"), ("demo-miro", "null")):
        p = apply_overrides(params, [f"train.run_name={name}", f"train.rewards={rewards}", f"train.steps={steps}",
                                     f"train.eval_every={max(1, steps // 3)}", f"train.checkpoint_every={max(1, steps // 3)}"])
        out = train_stage(p, resume=True, manifest=f"manifests/train-{name}.json")
        typer.echo(f"[train] {name}: {out['steps']} steps, loss {out['loss']:.4f} -> {out['checkpoint']} (MLflow run {out['mlflow_run_id']})")
        summary = evaluate_stage(p, manifest=f"manifests/eval-{name}.json")
        summaries[name] = summary
        typer.echo(f"[evaluate] {name}: judge accuracy {summary['overall']:.3f} -> {summary['output']}")
    typer.echo("[demo] reward means (baseline vs MIRO):")
    for r in summaries["demo-miro"]["rewards"]:
        b = summaries["demo-baseline"]["rewards"][r]["mean"]
        m = summaries["demo-miro"]["rewards"][r]["mean"]
        typer.echo(f"    {r:18s} {b:.3f}  {m:.3f}")
    from miroflow.stages import sweep_stage

    sp = apply_overrides(params, ["train.run_name=demo-miro", "eval.num_prompts=12", "eval.images_per_prompt=2",
                                  "eval.steps=20", "sweep.guidance_scales=[0, 0.5]", "sweep.target_values=[0, 0.5, 1]",
                                  "sweep.best_of_n=[1, 2, 4]"])
    doc = sweep_stage(sp, manifest="manifests/sweep-demo-miro.json")
    typer.echo(f"[sweep] demo-miro: {len(doc['points'])} points (ω, {sp.sweep.target_reward} target, best-of-N) -> {doc['output']}")
    typer.echo("[demo] browse runs: mlflow ui --backend-store-uri sqlite:///work/mlflow.db")


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
