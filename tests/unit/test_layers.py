"""The layer contract (pyproject.toml [tool.importlinter]): kept by the code, and able to fail.

``lint-imports`` runs on the real package (every contract kept), then on a copy of it in which a
lower layer imports a stage — that copy must break the contract, so the check cannot pass vacuously.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_layer_contracts_are_kept() -> None:
    res = _lint(REPO, REPO / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" in res.stdout and " 0 broken" in res.stdout


def test_a_lower_layer_importing_a_stage_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        REPO / "src" / "miroflow", tmp_path / "src" / "miroflow", ignore=shutil.ignore_patterns("__pycache__")
    )
    victim = tmp_path / "src" / "miroflow" / "data" / "shards.py"
    victim.write_text(victim.read_text() + "\nfrom miroflow.stages import train as _upward  # noqa: E402,F401\n")
    res = _lint(tmp_path, tmp_path / "src")
    assert res.returncode != 0
    assert "lower layers never import a stage BROKEN" in res.stdout
    assert "miroflow.data.shards -> miroflow.stages" in res.stdout


def test_src_never_imports_prefect(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        REPO / "src" / "miroflow", tmp_path / "src" / "miroflow", ignore=shutil.ignore_patterns("__pycache__")
    )
    victim = tmp_path / "src" / "miroflow" / "util.py"
    victim.write_text(victim.read_text() + "\nimport prefect  # noqa: E402,F401\n")
    res = _lint(tmp_path, tmp_path / "src")
    assert res.returncode != 0 and "never imports prefect (flows/ are the only Prefect layer) BROKEN" in res.stdout
