"""Run a pipeline stage as a flow run of a deployment (a worker of its pool runs it) and wait for it.

The pipeline flow (flows/pipeline.py) calls :func:`check_deployments` before any stage and
:func:`run_stage` for each GPU stage when ``dispatch="deployments"``. The dispatched run gets the
**fully resolved** params as its ``params`` form on top of the code defaults (``params_file`` empty,
no overrides), so nothing the pipeline resolved is lost (``tracking.*`` included); it is a subflow of
the pipeline run in the UI. docs/control-room.md, "Work pools and dispatch".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from flows._records import flow_run_url
from miroflow.config import Params
from miroflow.errors import InputError, OperationalError

__all__ = ["Dispatch", "DispatchError", "MissingDeploymentError", "check_deployments", "run_stage"]

#: Where the pipeline's GPU stages run: in the pipeline's own process, or as runs of the gpu deployments.
Dispatch = Literal["local", "deployments"]

#: Seconds between state polls of a dispatched run.
POLL_S = 2.0


class MissingDeploymentError(InputError, ValueError):
    """A dispatch target (flow parameter) names a deployment the Prefect server does not have."""


class DispatchError(OperationalError, RuntimeError):
    """A dispatched flow run did not complete."""


def _api() -> str:
    return str(get_current_settings().api.url or "the ephemeral Prefect API")


def check_deployments(targets: Mapping[str, str]) -> dict[str, str]:
    """Fail fast unless every deployment of ``targets`` (flow parameter -> ``flow/deployment``) exists.

    Returns:
        parameter -> the deployment's work pool name (``""`` when it has none).

    Raises:
        MissingDeploymentError: naming the parameter, the deployment and the API, with the fix.
    """
    pools = {}
    with get_client(sync_client=True) as client:
        for parameter, name in targets.items():
            try:
                dep = client.read_deployment_by_name(name)
            except (ObjectNotFound, ValueError) as e:  # ValueError: not "flow/deployment"
                raise MissingDeploymentError(
                    f"{parameter}: deployment {name!r} not found on {_api()} ({type(e).__name__}); register the "
                    "deployments with `miroflow serve` (or `prefect deploy --all`), or run with dispatch=local"
                ) from None
            pools[parameter] = dep.work_pool_name or ""
    return pools


def run_stage(
    deployment: str, stage: str, params: Params, run_name: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``deployment`` with ``params`` (resolved) as a subflow run, wait for it, return its result.

    Args:
        deployment: ``flow/deployment``, e.g. ``train/train``.
        stage: the stage's name in logs and the run name (``<stage>-<run_name>``).
        params: the fully resolved params; sent as the ``params`` form, with ``params_file`` empty
            and no overrides, so the run resolves exactly these values.
        run_name: the model's run name (``train.run_name``).
        extra: further flow parameters (e.g. ``{"resume": True}``).

    Returns:
        The dispatched flow's persisted JSON result; ``{"flow_run_id": ...}`` only when that result
        cannot be read here (result storage not shared with the worker's machine: a warning says so).

    Raises:
        DispatchError: the run ended in any state but Completed; names the deployment, the run and its state.
    """
    log = get_run_logger()
    parameters = {"params_file": None, "overrides": [], "params": params.model_dump(mode="json"), **(extra or {})}
    log.info("%s of %s: dispatching to deployment %s and waiting for a worker of its pool", stage, run_name, deployment)
    run = run_deployment(
        name=deployment,
        parameters=parameters,
        flow_run_name=f"{stage}-{run_name}",
        timeout=None,
        poll_interval=POLL_S,
    )
    url = flow_run_url(str(run.id)) or str(run.id)
    state = run.state
    if state is None or not state.is_completed():
        kind = state.type.value if state is not None else "unknown"
        message = (state.message if state is not None else None) or "no message"
        raise DispatchError(
            f"{stage} of {run_name}: the run {run.name} of deployment {deployment} ended {kind}: {message} ({url})"
        )
    log.info("%s of %s: run %s of %s completed (%s)", stage, run_name, run.name, deployment, url)
    try:
        result = state.result()
    except Exception as e:  # noqa: BLE001 - results on another machine's disk: the run still completed
        log.warning(
            "%s of %s: the result of run %s is not readable here (%s: %s); set PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK "
            "to storage both machines share",
            stage,
            run_name,
            run.name,
            type(e).__name__,
            e,
        )
        return {"flow_run_id": str(run.id)}
    return {**dict(result), "flow_run_id": str(run.id)} if isinstance(result, Mapping) else {"flow_run_id": str(run.id)}
