"""miroflow.launch without torchrun: the command line (params in a file, never on it), the ranks'
environment (MLflow run tags handed down), and the output pump (metric lines to the metrics logger,
progress-bar redraws collapsed, exit status and tail) on a real subprocess."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from miroflow.checkpoint import run_uri
from miroflow.config import Params, apply_overrides
from miroflow.content_keys import stage_hash
from miroflow.launch import (
    METRICS_PREFIX,
    child_env,
    should_launch,
    stream_process,
    torchrun_command,
)
from miroflow.preflight import check_params
from miroflow.tracking import METRICS_LOGGER, register_tag_provider, unregister_tag_provider


def test_one_machine_command_keeps_the_params_in_a_file(tmp_path: Path) -> None:
    secret = "https://user:s3cr3t@mlflow.example:5000"
    p = apply_overrides(Params(), ["train.nproc_per_node=2", f"tracking.tracking_uri={secret}"])
    cmd = torchrun_command(p, tmp_path / "p.yaml", tmp_path / "r.json", resume=True, max_steps=5, python="py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    assert cmd[6:] == [
        "-m",
        "miroflow",
        "train",
        "--params",
        str(tmp_path / "p.yaml"),
        "--result",
        str(tmp_path / "r.json"),
        "--log-metrics",
        "--resume",
        "--max-steps",
        "5",
    ]
    assert not any("s3cr3t" in a for a in cmd)


def test_several_machines_use_a_c10d_rendezvous_with_a_shared_id(tmp_path: Path) -> None:
    ov = ["train.nnodes=2", "train.nproc_per_node=4", "train.rdzv_endpoint=10.0.0.5:29400", "train.rdzv_timeout_s=30"]
    p = apply_overrides(Params(), ov)
    cmd = torchrun_command(p, tmp_path / "p.yaml", tmp_path / "r.json")
    i = cmd.index("--nnodes")
    rdzv_id = run_uri(p).rsplit("/", 1)[-1]
    assert cmd[i : i + 10] == [
        "--nnodes",
        "2",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.0.0.5:29400",
        "--rdzv_id",
        rdzv_id,
        "--rdzv_conf",
        "join_timeout=30",
    ]
    assert "--standalone" not in cmd and rdzv_id.startswith("miro-")
    with pytest.raises(ValueError, match=r"train\.rdzv_endpoint: required"):
        torchrun_command(apply_overrides(Params(), ["train.nnodes=2"]), tmp_path / "p", tmp_path / "r")


def test_launch_fields_are_execution_only_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Params()
    other = apply_overrides(
        base, ["train.nproc_per_node=8", "train.nnodes=4", "train.rdzv_endpoint=h:1", "train.rdzv_timeout_s=9"]
    )
    assert run_uri(other) == run_uri(base) and stage_hash(other, "sweep") == stage_hash(base, "sweep")
    assert check_params(other) == []
    problems = check_params(apply_overrides(base, ["train.nnodes=2", "train.nproc_per_node=3"]))
    assert problems[0].startswith("train.rdzv_endpoint: required when train.nnodes > 1")
    assert problems[1].startswith("train.batch_size: 64 is not divisible by the world size 6")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert should_launch(other) and not should_launch(base)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank of a torchrun job: train here
    assert not should_launch(other)


def test_ranks_inherit_the_run_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    def provider() -> dict[str, str]:
        return {"prefect.flow_run_id": "abc"}

    monkeypatch.setenv("DVC_STAGE", "train@miro")
    monkeypatch.delenv("MIROFLOW_RUN_TAGS", raising=False)
    register_tag_provider(provider)
    try:
        env = child_env({"PATH": "/bin"})
    finally:
        unregister_tag_provider(provider)
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert json.loads(env["MIROFLOW_RUN_TAGS"]) == {"prefect.flow_run_id": "abc", "dvc.stage": "train@miro"}


def test_output_pump_routes_metric_lines_and_reports_the_exit_status(caplog: pytest.LogCaptureFixture) -> None:
    script = (
        "import sys\n"
        "sys.stdout.write('bar 0%\\rbar 50%\\r" + METRICS_PREFIX + "step 1: loss=0.5\\n')\n"
        "print('hello')\n"
        "sys.stdout.write('bar 100%\\rbar done\\n')\n"
        "print('boom', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    seen: list[str] = []
    with caplog.at_level(logging.INFO, logger=METRICS_LOGGER):
        rc, tail = stream_process([sys.executable, "-c", script], child_env(), seen.append)
    assert rc == 3
    assert [r.getMessage() for r in caplog.records if r.name == METRICS_LOGGER] == ["step 1: loss=0.5"]
    assert seen == ["hello", "bar done", "boom"]
    assert tail == ["step 1: loss=0.5", "hello", "bar done", "boom"]
    # metrics logger not listening (the CLI): the metric line is echoed like any other
    logging.getLogger(METRICS_LOGGER).setLevel(logging.WARNING)
    try:
        seen.clear()
        stream_process([sys.executable, "-c", script], child_env(), seen.append)
    finally:
        logging.getLogger(METRICS_LOGGER).setLevel(logging.NOTSET)
    assert seen[0] == "step 1: loss=0.5"
