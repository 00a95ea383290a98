"""`dvc repro prepare` in a fresh git+DVC repo: skips when nothing changed, reruns on a param change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_prepare_is_incremental(tmp_path: Path) -> None:
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["num_samples"] = 40
    params["data"]["shard_size"] = 20
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q"], work)
    _run([str(BIN / "dvc"), "init", "-q"], work)

    out1 = _run([str(BIN / "dvc"), "repro", "prepare"], work)
    assert "Running stage 'prepare'" in out1
    manifest = yaml.safe_load((work / "manifests" / "shards.json").read_text())
    assert manifest["num_samples"] == 40

    out2 = _run([str(BIN / "dvc"), "repro", "prepare"], work)
    assert "Running stage 'prepare'" not in out2
    assert "didn't change" in out2 or "up to date" in out2

    params["data"]["num_samples"] = 60
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    out3 = _run([str(BIN / "dvc"), "repro", "prepare"], work)
    assert "Running stage 'prepare'" in out3
    manifest = yaml.safe_load((work / "manifests" / "shards.json").read_text())
    assert manifest["num_samples"] == 60
