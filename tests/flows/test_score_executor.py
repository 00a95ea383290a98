"""The score-dataset flow picks its task runner from the resolved params at run time (score.executor):
called as a deployment runs it (params_file + overrides), Dask scores the same tables as threads, on a
LocalCluster or an existing scheduler (score.dask_address); a scheduler that does not answer fails the
run before any task, naming score.dask_address."""

from __future__ import annotations

import logging
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from miroflow.config import load_params
from miroflow.prepare import run_prepare
from miroflow.rewards import clear_reward_cache
from tests.conftest import free_port

pytest.importorskip("prefect_dask")


def _params_file(tmp: Path) -> Path:
    doc = {
        "data": {
            "num_samples": 24,
            "shard_size": 8,
            "synthetic_captions": True,
            "manifest": str(tmp / "manifests" / "shards.json"),
        },
        "score": {
            "rewards": ["sharpness", "contrast", "shapes_alignment"],
            "batch_size": 8,
            "device": "cpu",
            "num_bins": 8,
            "max_workers": 2,
            "manifest": str(tmp / "manifests" / "scores.json"),
            "bins": str(tmp / "manifests" / "bins.json"),
        },
        "storage": {"root": str(tmp / "store")},
        "tracking": {"enabled": False},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _tables(params_file: Path) -> dict[str, bytes]:
    """Every score table of the manifest (URI -> bytes); the tables are then removed, so the next run rescores."""
    import json

    p = load_params(params_file)
    out = {}
    for t in json.loads(Path(p.score.manifest).read_text())["tables"]:
        path = Path(t["uri"])
        out[t["uri"]] = path.read_bytes()
        path.unlink()
    return out


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [f"{logging.getLevelName(x.level)} {x.message}" for x in logs]


def test_dask_scores_the_same_tables_as_threads(prefect_server: None, tmp_path: Path) -> None:
    from distributed import LocalCluster

    from flows.score_dataset import score_dataset

    params_file = _params_file(tmp_path)
    run_prepare(load_params(params_file))
    clear_reward_cache()

    threads = score_dataset(params_file=str(params_file), overrides=["score.executor=thread"])
    assert threads["scored"] == 3 and threads["executor"] == "2 threads"
    reference = _tables(params_file)

    state = score_dataset(params_file=str(params_file), overrides=["score.executor=dask"], return_state=True)
    assert state.is_completed(), state.message
    local = state.result()
    assert local["scored"] == 3 and local["executor"] == "dask LocalCluster of 2 worker processes"
    assert local["bins"]["hash"] == threads["bins"]["hash"]
    assert _tables(params_file) == reference  # byte-identical parquet
    assert any("scoring shards on dask LocalCluster" in x for x in _logs(state.state_details.flow_run_id))

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        remote = score_dataset(
            params_file=str(params_file), overrides=["score.executor=dask", f"score.dask_address={address}"]
        )
    assert remote["scored"] == 3 and remote["executor"] == f"dask scheduler {address}"
    assert remote["bins"]["hash"] == threads["bins"]["hash"]
    assert _tables(params_file) == reference


def test_unreachable_dask_address_fails_naming_the_field(prefect_server: None, tmp_path: Path) -> None:
    from flows.score_dataset import score_dataset

    params_file = _params_file(tmp_path)
    run_prepare(load_params(params_file))
    address = f"tcp://127.0.0.1:{free_port()}"
    state = score_dataset(
        params_file=str(params_file),
        overrides=["score.executor=dask", f"score.dask_address={address}"],
        return_state=True,
    )
    assert state.is_failed()
    message = (state.message or "") + str(state.result(raise_on_failure=False))
    assert "score.dask_address" in message and address in message, message
    assert not Path(load_params(params_file).score.manifest).exists()  # failed before any shard was scored
