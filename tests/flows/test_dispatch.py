"""flows/_dispatch.py under a real temporary Prefect server: a dispatched run that fails fails the caller
with a message naming the stage, the deployment, the run and its state (the successful path, with real
workers: tests/flows/test_serve.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from miroflow.config import Params


def _fail_runs_of(deployment_id: Any, message: str, stop: threading.Event) -> None:
    """Play a worker whose run crashes: mark the deployment's first flow run Failed."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        while not stop.is_set():
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            if runs:
                client.set_flow_run_state(runs[0].id, Failed(message=message), force=True)
                return
            time.sleep(0.2)


def test_a_failed_dispatched_run_fails_the_caller_naming_the_deployment(prefect_server: None) -> None:
    from prefect import flow

    from flows._dispatch import DispatchError, run_stage
    from flows.train import train_model

    deployment_id = train_model.to_deployment(name="dispatch-fails").apply()
    stop = threading.Event()
    worker = threading.Thread(target=_fail_runs_of, args=(deployment_id, "CUDA out of memory", stop), daemon=True)
    worker.start()

    @flow(name="dispatch-caller")
    def caller() -> dict[str, Any]:
        return run_stage("train/dispatch-fails", "train", Params(), "model")

    try:
        state = caller(return_state=True)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert state.is_failed()
    message = state.message or ""
    assert "train of model: the run train-model of deployment train/dispatch-fails ended FAILED" in message, message
    assert "CUDA out of memory" in message
    with pytest.raises(DispatchError, match="train/dispatch-fails"):
        state.result()
