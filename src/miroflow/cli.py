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
def demo(params_file: ParamsFile = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Run every stage on the embedded defaults (the shapes domain) and print where outputs went."""
    from miroflow.prepare import run_prepare

    params = _load(params_file, overrides)
    manifest = run_prepare(params)
    typer.echo(f"[prepare] {manifest['num_samples']} samples, {len(manifest['shards'])} shards -> {manifest['root']}")
    typer.echo(f"[prepare] manifest -> {params.data.manifest}")

    from miroflow.score import run_bin, run_score

    scores = run_score(params)
    typer.echo(f"[score] {scores['num_rows']} rows in {len(scores['tables'])} tables; manifest -> {params.score.manifest}")
    bins = run_bin(params)
    typer.echo(f"[bin] {bins.num_bins} bins for {', '.join(bins.names)} -> {params.score.bins}")


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
