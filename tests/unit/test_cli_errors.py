"""The CLI's error boundary: bad input -> at most 3 lines, no traceback, exit 2; --debug shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from miroflow.cli import app


def _empty_params(tmp_path: Path) -> str:
    f = tmp_path / "empty.yaml"
    f.write_text("{}\n")
    return str(f)


def _settings(tmp_path: Path) -> list[str]:
    return [
        "-S",
        f"storage.root={tmp_path / 'store'}",
        "-S",
        f"data.manifest={tmp_path / 'm' / 'shards.json'}",
        "-S",
        f"score.manifest={tmp_path / 'm' / 'scores.json'}",
        "-S",
        f"score.bins={tmp_path / 'm' / 'bins.json'}",
        "-S",
        "tracking.enabled=false",
    ]


def _check_short(result: object, code: int, *fragments: str) -> list[str]:
    out: str = result.output  # type: ignore[attr-defined]
    lines = [line for line in out.splitlines() if line.strip()]
    assert result.exit_code == code, out  # type: ignore[attr-defined]
    assert 1 <= len(lines) <= 3, out
    assert "Traceback" not in out, out
    for f in fragments:
        assert f in out, out
    return lines


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["score"], ["data.manifest", "run the prepare stage first"]),
        (["bin"], ["score.manifest", "does not exist"]),
        (["train", "--max-steps", "-1"], ["--max-steps: must be >= 1"]),
        (["train", "-S", "train.model=huge"], ["train.model: unknown model size 'huge'"]),
        (["evaluate", "-S", "eval.rewards=[bogus]"], ["eval.rewards: unknown reward 'bogus'"]),
        (["evaluate", "-S", "eval.reward_targets.sharpness=7"], ["eval.reward_targets.sharpness"]),
        (["prepare", "-S", "data.domain=import"], ["data.import_uri: required"]),
        (["sweep", "-S", "sweep.select_by=bogus"], ["sweep.select_by"]),
    ],
)
def test_bad_input_is_at_most_three_lines_and_exit_2(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "-p", _empty_params(tmp_path), *_settings(tmp_path)])
    _check_short(result, 2, *fragments)


def test_many_problems_are_capped_at_three_lines(tmp_path: Path) -> None:
    bad = ["-S", "train.model=huge", "-S", "sweep.select_by=x", "-S", "eval.rewards=[y]", "-S", "train.rewards=[z]"]
    result = CliRunner().invoke(app, ["train", "-p", _empty_params(tmp_path), *_settings(tmp_path), *bad])
    lines = _check_short(result, 2)
    assert lines[-1].endswith("more (miroflow params validate lists all)")


def test_damaged_manifest_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "shards.json").write_text("{ this is not json")
    result = CliRunner().invoke(app, ["score", "-p", _empty_params(tmp_path), *_settings(tmp_path)])
    _check_short(result, 2, "shards.json")


def test_latin1_params_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_bytes("data:\n  split: caf\xe9\n".encode("latin-1"))
    result = CliRunner().invoke(app, ["prepare", "-p", str(f)])
    _check_short(result, 2, "params.yaml")


def test_params_validate_runs_the_semantic_checks(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  model: huge\nscore:\n  rewards: [sharpness, nosuch]\n")
    result = CliRunner().invoke(app, ["params", "validate", "--file", str(f)])
    assert result.exit_code == 1
    assert "train.model: unknown model size 'huge'" in result.output
    assert "score.rewards: unknown reward 'nosuch'" in result.output


def test_console_entry_one_line_then_traceback_with_debug(tmp_path: Path) -> None:
    """The real console process: what a user sees (stderr), with and without MIROFLOW_DEBUG."""
    cmd = [sys.executable, "-m", "miroflow.cli", "bin", "-p", _empty_params(tmp_path), *_settings(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "MIROFLOW_DEBUG"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) <= 3, plain.stderr
    assert "score.manifest" in plain.stderr
    debug = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "MIROFLOW_DEBUG": "1"}, cwd=tmp_path, timeout=300
    )
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr or "PreflightError" in debug.stderr, debug.stderr
