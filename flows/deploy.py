"""Register every miroflow flow as a deployment of a running Prefect server (the dashboard).

Two modes (docs/control-room.md, "Work pools and dispatch"):

- **work pools** (what ``miroflow serve`` runs)::

      python flows/deploy.py --pools --workdir DIR

  creates the ``process`` work pools ``cpu`` and ``gpu`` if missing (``gpu``: one flow run at a time),
  registers one deployment per flow on the pool ``prefect.yaml`` names for it (same name, tags,
  description, concurrency limit and extra parameters), with the code of this checkout (absolute
  entrypoints) and ``DIR`` as the working directory of every flow run, then exits. Workers
  (``prefect worker start --pool cpu``) run the flow runs.
- **serve** (one process, no pools)::

      prefect server start --host 127.0.0.1 --port 4200      # in one shell
      export PREFECT_API_URL=http://127.0.0.1:4200/api
      python flows/deploy.py                                  # in another: serves until Ctrl-C

Either way the forms show every code default (list fields too: :func:`flows._records.schema_with_code_defaults`).
Then trigger runs from the dashboard or the CLI, e.g.
``prefect deployment run 'miro-pipeline/miro-pipeline' -p params_file=params.yaml --watch``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from prefect import serve  # noqa: E402
from prefect.client.orchestration import SyncPrefectClient, get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound  # noqa: E402
from prefect.runner.storage import LocalStorage  # noqa: E402
from prefect.utilities.callables import ParameterSchema  # noqa: E402
from prefect.workers.process import ProcessWorker  # noqa: E402

from flows._records import schema_with_code_defaults  # noqa: E402
from flows.evaluate import evaluate  # noqa: E402
from flows.pipeline import miro_pipeline  # noqa: E402
from flows.score_dataset import score_dataset  # noqa: E402
from flows.sweep import sweep, tts  # noqa: E402
from flows.train import train_model  # noqa: E402
from flows.tune import tune_targets  # noqa: E402

#: Every flow deployed; their results are persisted as JSON (flows/_records.py ``FLOW_RESULTS``).
FLOWS = (miro_pipeline, score_dataset, train_model, evaluate, sweep, tts, tune_targets)
#: The work pools (``process`` type locally) and their concurrency limits (``gpu``: one training per worker).
POOLS = ("cpu", "gpu")
POOL_LIMITS: dict[str, int] = {"gpu": 1}
#: prefect.yaml's parameters that belong to the image setup (S3 bucket), not to local pools.
IMAGE_PARAMETERS = ("params_file", "overrides")
PREFECT_YAML = REPO / "prefect.yaml"


def _with_code_defaults(d: RunnerDeployment) -> RunnerDeployment:
    """``d`` with its form showing every code default (list fields too)."""
    schema = schema_with_code_defaults(d._parameter_openapi_schema.model_dump())
    d._parameter_openapi_schema = ParameterSchema(**schema)
    return d


def deployments() -> list[Any]:
    """One deployment per flow (named after the flow) for :func:`prefect.serve`: no pool, this process runs them."""
    return [_with_code_defaults(f.to_deployment(name=f.name)) for f in FLOWS]


def yaml_specs(path: Path = PREFECT_YAML) -> dict[str, dict[str, Any]]:
    """prefect.yaml's deployments by name (pool, tags, description, limit, parameters): the one source of truth."""
    doc = yaml.safe_load(path.read_text())
    return {d["name"]: d for d in doc["deployments"]}


def pool_deployments(workdir: Path, specs: dict[str, dict[str, Any]] | None = None) -> list[RunnerDeployment]:
    """One deployment per flow on its prefect.yaml pool, running this checkout's code in ``workdir``.

    Args:
        workdir: the working directory of every flow run (relative params paths resolve there);
            made absolute.
        specs: prefect.yaml's deployments (default: read from the checkout).
    """
    specs = yaml_specs() if specs is None else specs
    out = []
    for f in FLOWS:
        spec = specs.get(f.name)
        if spec is None:
            raise KeyError(f"prefect.yaml: no deployment named {f.name!r} (flow {f.name})")
        params = {k: v for k, v in (spec.get("parameters") or {}).items() if k not in IMAGE_PARAMETERS}
        limit = spec.get("concurrency_limit")
        d = f.to_deployment(
            name=spec["name"],
            work_pool_name=spec["work_pool"]["name"],
            work_queue_name=spec["work_pool"].get("work_queue_name"),
            description=" ".join(str(spec["description"]).split()),
            tags=list(spec.get("tags") or []),
            parameters=params,
            concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
            enforce_parameter_schema=bool(spec.get("enforce_parameter_schema", True)),
        )
        # the worker's flow-run process: cd workdir (pull step), then load the flow from this checkout
        d.storage = LocalStorage(str(Path(workdir).resolve()))
        module = Path(sys.modules[f.fn.__module__].__file__ or "").resolve()
        d.entrypoint = f"{module}:{f.fn.__name__}"
        out.append(_with_code_defaults(d))
    return out


def ensure_pools(client: SyncPrefectClient, names: tuple[str, ...] = POOLS) -> list[str]:
    """Create the ``process`` work pools ``names`` if missing and set their limits (:data:`POOL_LIMITS`).

    A worker started at the same time may create a pool first; that is fine (it is then updated).

    Raises:
        ValueError: a pool exists with another type (its workers would not be process workers).
    """
    lines = []
    for name in names:
        limit = POOL_LIMITS.get(name)
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template, concurrency_limit=limit)
                )
                lines.append(f"work pool {name}: created (process, concurrency limit {limit})")
                continue
            except ObjectAlreadyExists:
                pool = client.read_work_pool(name)
        if pool.type != "process":
            raise ValueError(
                f"work pool {name!r} exists with type {pool.type!r}: miroflow serve runs process workers; "
                "use another Prefect server (--api-url) or delete the pool"
            )
        if limit is not None and pool.concurrency_limit != limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
        lines.append(f"work pool {name}: ready (process, concurrency limit {limit})")
    return lines


def wait_for_api(client: SyncPrefectClient, timeout_s: float) -> None:
    """Poll the API's health endpoint until it answers (the server may still be starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        err = client.api_healthcheck()
        if err is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect API did not answer within {timeout_s:.0f} s: {err}")
        time.sleep(0.5)


def register_on_pools(workdir: Path, timeout_s: float = 180.0) -> list[str]:
    """Wait for the API, ensure the pools, register every pool deployment; returns one line per action."""
    with get_client(sync_client=True) as client:
        wait_for_api(client, timeout_s)
        lines = ensure_pools(client)
    for line in lines:
        print(line, flush=True)
    for d in pool_deployments(workdir):
        d.apply()
        line = f"deployment {d.flow_name}/{d.name}: pool {d.work_pool_name}, tags {','.join(d.tags)}"
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    """``--pools``: register the pool deployments and exit; otherwise serve every flow in this process."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", action="store_true", help="register on the cpu/gpu process pools and exit")
    ap.add_argument("--workdir", type=Path, default=Path.cwd(), help="working directory of the flow runs")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the API")
    args = ap.parse_args(argv)
    if args.pools:
        register_on_pools(args.workdir, args.timeout)
        print("deployments registered", flush=True)
    else:
        serve(*deployments())


if __name__ == "__main__":
    main()
