"""The train flow launches torchrun when train.nproc_per_node > 1 (miroflow.launch): two gloo ranks on CPU
train a tiny model through the flow, the loss reaches the Prefect run log, the MLflow run is linked to the
flow run, and the result is the TrainResult rank 0 wrote (its checkpoint loads). Bad launch params fail
naming the field: nnodes > 1 without train.rdzv_endpoint before any process starts, an endpoint where no
other machine joins with torchrun's exit status and the last lines of its output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest

from miroflow.config import Params, apply_overrides
from miroflow.prepare import run_prepare
from miroflow.results import TrainResult
from miroflow.score import run_bin, run_score
from tests.conftest import free_port


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A prepared, scored and binned 32-sample dataset, and tiny 3-step training overrides."""
    root = tmp_path_factory.mktemp("launch")
    ov = [
        f"storage.root={root}/store",
        "data.num_samples=32",
        "data.shard_size=16",
        f"data.manifest={root}/manifests/shards.json",
        f"score.manifest={root}/manifests/scores.json",
        f"score.bins={root}/manifests/bins.json",
        "score.rewards=[sharpness, contrast]",
        "score.num_bins=8",
        "tracking.enabled=false",
        "train.steps=3",
        "train.batch_size=8",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "train.sample_steps=1",
    ]
    params = apply_overrides(Params(), ov)
    run_prepare(params)
    run_score(params)
    run_bin(params)
    return ov


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [f"{logging.getLevelName(x.level)} {x.message}" for x in logs]


def test_train_flow_runs_two_ranks_under_torchrun(
    prefect_server: None, data_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from flows.train import train_model
    from miroflow.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    keys = tmp_path / "keys.jsonl"
    overrides = [
        *data_overrides,
        "train.run_name=ddp-flow",
        "train.nproc_per_node=2",
        f"train.sample_log={keys}",
        "tracking.enabled=true",
        f"tracking.tracking_uri={tracking}",
        "tracking.experiment=launch",
    ]
    state = train_model(params_file=None, overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    result = TrainResult.from_dict(out)  # the same result as an in-process training
    assert result.steps == 3 and result.run_name == "ddp-flow" and result.loss is not None
    assert Path(result.checkpoint).is_absolute() and result.checkpoint.endswith("/final")
    model, spec = load_model(result.checkpoint)
    assert spec["reward_names"] == ["sharpness", "contrast"] and sum(p.numel() for p in model.parameters()) > 0
    assert result.manifest is not None and json.loads(Path(result.manifest).read_text())["steps"] == 3

    # both ranks trained: each logged its own rows of every step (rank 1 to "<sample_log>.rank1")
    rank0 = [json.loads(x) for x in keys.read_text().splitlines()]
    rank1 = [json.loads(x) for x in Path(f"{keys}.rank1").read_text().splitlines()]
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [0, 1, 2]
    for a, b in zip(rank0, rank1, strict=True):
        assert len(a["keys"]) == len(b["keys"]) == 4 and not set(a["keys"]) & set(b["keys"])

    # the loss reached the Prefect run log; the MLflow run is linked to the flow run and saw world size 2
    run_id = state.state_details.flow_run_id
    logs = _logs(run_id)
    losses = [x for x in logs if x.startswith("INFO step ") and "loss=" in x]
    assert len(losses) == 3 and losses[0].startswith("INFO step 1: loss="), logs
    assert any(x.startswith("INFO trained 3 steps") for x in logs), logs  # rank 0's other output too
    run = MlflowClient(tracking).get_run(result.mlflow_run_id or "")
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["prefect.flow_run_id"] == str(run_id) and run.data.tags["prefect.flow_name"] == "train"


def test_several_nodes_without_an_endpoint_fail_before_any_process(
    prefect_server: None, data_overrides: list[str]
) -> None:
    from flows.train import train_model

    state = train_model(params_file=None, overrides=[*data_overrides, "train.nnodes=2"], return_state=True)
    assert state.is_failed()
    message = (state.message or "") + str(state.result(raise_on_failure=False))
    assert "train.rdzv_endpoint: required when train.nnodes > 1" in message, message


def test_a_rendezvous_nobody_joins_fails_with_status_and_output(data_overrides: list[str]) -> None:
    from miroflow.launch import LaunchError, launch_train

    endpoint = f"127.0.0.1:{free_port()}"
    params = apply_overrides(
        Params(),
        [*data_overrides, "train.run_name=lonely", "train.nnodes=2", f"train.rdzv_endpoint={endpoint}"]
        + ["train.rdzv_timeout_s=2"],
    )
    seen: list[str] = []
    with pytest.raises(LaunchError) as err:
        launch_train(params, echo=seen.append)
    msg = str(err.value)
    assert err.value.returncode == 1 and err.value.tail and seen
    assert f"train.rdzv_endpoint={endpoint}" in msg and "train.rdzv_timeout_s=2" in msg, msg
    assert "last output lines:" in msg and "RendezvousTimeoutError" in msg


def test_interrupting_the_launcher_stops_every_rank(data_overrides: list[str], tmp_path: Path) -> None:
    """Ctrl-C on ``miroflow train`` while two ranks train: torchrun and both ranks are gone afterwards."""
    psutil = pytest.importorskip("psutil")
    (tmp_path / "params.yaml").write_text("{}\n")
    sets = [
        x
        for o in [*data_overrides, "train.run_name=interrupted", "train.steps=100000", "train.nproc_per_node=2"]
        for x in ("-S", o)
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "miroflow", "train", "-p", str(tmp_path / "params.yaml"), *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        # Ctrl-C as a terminal delivers it: a pytest started in the background of a non-interactive shell
        # ignores SIGINT, and an ignored SIGINT is inherited (Python then installs no handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    ranks: list[object] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the parent echoes rank 0's metric lines
            seen.append(line)
            if line.startswith("step 2: loss="):
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
        # keep draining the pipe: a parent blocked writing to a full pipe could not react to the signal
        drain = threading.Thread(target=lambda: [seen.append(x) for x in proc.stdout or []], daemon=True)
        drain.start()
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) >= 3, ranks  # torchrun and its two ranks
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0, "".join(seen[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"left behind: {alive}"
