"""The parts of the compose stack that run without Docker, run for real (slow).

A real PostgreSQL 15 (tests/pg_server.py) gets the `mlflow` database the postgres image creates
from POSTGRES_DB and then infra/postgres/*.sql applied the way the image's init does (psql,
ON_ERROR_STOP). The Prefect server starts with the compose `prefect` service's environment (the
host `postgres` pointed at the test server) and must keep its tables in the `prefect` database.
The compose `deploy` service's own script then runs in a copy of the image's /opt/miroflow layout:
it must create both pools, cap gpu at 1 and register every deployment of prefect.yaml, twice (a
second `docker compose up` reruns it). Finally the Kubernetes pool is created from the base job
template with `prefect work-pool create --type kubernetes --base-job-template`, as docs/infra.md says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, stop_process, wait_for_http
from tests.infra.infra_checks import BASE_JOB_TEMPLATE, INFRA, REPO, command_words, load_compose, services
from tests.pg_server import PostgresServer, missing_reason

_MISSING = missing_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

BIN = Path(sys.executable).parent
STACK = services(load_compose())


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """PostgreSQL with the compose POSTGRES_DB (`mlflow`) and infra/postgres/*.sql applied."""
    user = STACK["postgres"]["environment"]["POSTGRES_USER"]
    server = PostgresServer(free_port(), superuser=user).start()
    try:
        server.create_database(STACK["postgres"]["environment"]["POSTGRES_DB"])
        for sql in sorted((INFRA / "postgres").glob("*.sql")):
            psql = [str(server.bin_dir / "psql"), "-v", "ON_ERROR_STOP=1", "--no-password"]
            psql += ["-h", "127.0.0.1", "-p", str(server.port), "-U", user, "-d", "mlflow", "-f", str(sql)]
            done = subprocess.run(psql, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prefect_api(pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` with the compose service's environment, on 127.0.0.1:<free port>."""
    svc = STACK["prefect"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {k: str(v).replace("@postgres:5432/", f"@127.0.0.1:{pg.port}/") for k, v in svc["environment"].items()}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_server_home"))
    port = free_port()
    cmd = command_words(svc["command"])
    assert cmd[:3] == ["prefect", "server", "start"]
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log_path = Path(env["PREFECT_HOME"]) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout_s=180, proc=proc)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\n{log_path.read_text(errors='replace')[-3000:]}") from e
            yield f"http://127.0.0.1:{port}/api"
        finally:
            stop_process(proc, timeout_s=30)


def _image_workdir(root: Path) -> Path:
    """What infra/Dockerfile puts in /opt/miroflow (flows/, params.yaml, prefect.yaml), under ``root``."""
    work = root / "opt-miroflow"
    shutil.copytree(REPO / "flows", work / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, work / name)
    (work / "manifests").mkdir()
    return work


def _run_deploy_service(api: str, workdir: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """The compose `deploy` service's entrypoint + command, with its environment, in ``workdir``."""
    svc = STACK["deploy"]
    entry, command = svc["entrypoint"], svc["command"]
    assert entry == ["/bin/sh", "-c"] and len(command) == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env |= {k: str(v) for k, v in svc["environment"].items()}
    env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PYTHONPATH": str(workdir)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["/bin/sh", "-c", command[0]], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )


def _deployments(api: str) -> dict[str, dict[str, Any]]:
    rows = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).raise_for_status().json()
    return {d["name"]: d for d in rows}


def test_init_sql_creates_the_prefect_database(pg: PostgresServer) -> None:
    names = {row[0] for row in pg.query("postgres", "SELECT datname FROM pg_database")}
    assert {"mlflow", "prefect"} <= names


def test_prefect_server_keeps_its_tables_in_the_prefect_database(pg: PostgresServer, prefect_api: str) -> None:
    assert httpx.get(f"{prefect_api}/health", timeout=10).json() is True
    count = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
    assert int(str(pg.query("prefect", count)[0][0])) > 10, "Prefect migrated its schema into `prefect`"
    assert int(str(pg.query("mlflow", count)[0][0])) == 0, "and left MLflow's database alone"


def test_deploy_service_registers_every_deployment(prefect_api: str, tmp_path: Path) -> None:
    workdir = _image_workdir(tmp_path)
    for attempt in (1, 2):  # the one-shot runs again on every `docker compose up`
        done = _run_deploy_service(prefect_api, workdir, tmp_path / f"home{attempt}")
        assert done.returncode == 0, f"attempt {attempt}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    pools = {p["name"]: p for p in httpx.post(f"{prefect_api}/work_pools/filter", json={}, timeout=30).json()}
    assert {pools["cpu"]["type"], pools["gpu"]["type"]} == {"process"}
    assert pools["gpu"]["concurrency_limit"] == 1 and pools["cpu"]["concurrency_limit"] is None
    deployments = _deployments(prefect_api)
    assert set(deployments) == {"miro-pipeline", "score-dataset", "train", "evaluate", "sweep", "tts", "tune-targets"}
    for name, dep in deployments.items():
        assert dep["work_pool_name"] == ("gpu" if name in {"train", "sweep", "tts", "tune-targets"} else "cpu")
        assert dep["parameters"]["overrides"] == ["storage.root=s3://miroflow/store"], name
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/miroflow"}}
        ]
        assert dep["enforce_parameter_schema"] is True and dep["description"] and dep["tags"]
    assert deployments["train"]["global_concurrency_limit"]["limit"] == 1
    assert deployments["train"]["concurrency_options"]["collision_strategy"] == "ENQUEUE"


def test_kubernetes_pool_is_created_from_the_base_job_template(prefect_api: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path)}
    cmd = [str(BIN / "prefect"), "work-pool", "create", "gpu-k8s", "--type", "kubernetes"]
    cmd += ["--base-job-template", str(BASE_JOB_TEMPLATE)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = httpx.get(f"{prefect_api}/work_pools/gpu-k8s", timeout=30).raise_for_status().json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(BASE_JOB_TEMPLATE.read_text())
