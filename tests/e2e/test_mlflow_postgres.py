"""MLflow on a real PostgreSQL 15 backend: a tiny train + evaluate tracked through ``mlflow server``.

PostgreSQL is ``initdb``-ed into a temp dir and listens on 127.0.0.1 only (tests/pg_server.py);
a real ``mlflow server`` keeps its runs in it (``postgresql+psycopg2://`` backend store, proxied
local artifacts). The stages run through the CLI with ``-S tracking.tracking_uri=<server>`` (and
no ``MLFLOW_TRACKING_URI``), then the runs are read back with the MLflow client and straight from
PostgreSQL's ``runs``/``metrics``/``tags`` tables. Skipped (with the reason) only where PostgreSQL
is not installed; ``.ci/run`` installs it.

Driver note: SQLAlchemy 2.1 maps a bare ``postgresql://`` URI to psycopg 3, which is not
installed; the ``test`` extra brings psycopg2, so every URI here names ``+psycopg2``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from miroflow.cli import app
from tests.conftest import free_port, stop_process, wait_for_http
from tests.pg_server import PostgresServer, missing_reason

_MISSING = missing_reason()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

DATABASE = "mlflow"
STEPS = 3

#: A tiny baseline model (no reward scoring needed before training), tracked and registered.
SETTINGS = [
    "data.num_samples=32",
    "data.shard_size=32",
    "train.run_name=pg-tiny",
    "train.rewards=[]",
    "train.model=tiny",
    "train.text_encoder=learned",
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "eval.prompt_set=shapes:1",
    "eval.images_per_prompt=1",
    "eval.steps=2",
]


@dataclass
class MlflowOnPostgres:
    """A running ``mlflow server`` whose backend store is :attr:`pg`'s ``mlflow`` database."""

    url: str
    pg: PostgresServer
    artifacts: Path
    log_path: Path


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """PostgreSQL 15 on 127.0.0.1:<free port> with an empty ``mlflow`` database; stopped (fast) after the module."""
    server = PostgresServer(free_port())
    try:
        server.start()
        server.create_database(DATABASE)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_pg(pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowOnPostgres]:
    """A real ``mlflow server`` on 127.0.0.1:<free port> backed by ``pg``; its whole process group is gone after."""
    root = tmp_path_factory.mktemp("mlflow_pg")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    log_path = root / "mlflow_server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # No job runner: MLflow 3.17 otherwise forks 7 huey consumers (GenAI jobs miroflow never uses) that a
    # SIGTERM to the server leaves running; the tracking API and its PostgreSQL store are unaffected.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        pg.uri(DATABASE),
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "wb") as log_file:
        # own session: its pgid is its pid, so teardown can prove no worker outlived it
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
        try:
            try:
                wait_for_http(f"{url}/health", timeout_s=180, proc=proc)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\n{log_path.read_text(errors='replace')[-3000:]}") from e
            yield MlflowOnPostgres(url, pg, artifacts, log_path)
        finally:
            stop_process(proc, timeout_s=30)
            _reap_group(proc.pid)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap_group(pgid: int, timeout_s: float = 10.0) -> None:
    """After the server's own shutdown: SIGTERM what is left of group ``pgid``, then SIGKILL; fail if any survives."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(pgid):
            return
        os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _group_alive(pgid):
        raise RuntimeError(f"processes of the mlflow server (group {pgid}) survived SIGKILL")


def _cli(*args: str, settings: list[str]) -> tuple[int, str]:
    """Run one ``miroflow`` command in-process; (exit code, combined output)."""
    flags = [x for s in settings for x in ("-S", s)]
    result = CliRunner().invoke(app, [*args, "-p", "none.yaml", *flags])
    return result.exit_code, result.output


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project dir as cwd (storage, manifests and work/ land here); no MLFLOW_TRACKING_URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "none.yaml").write_text("{}\n")
    return tmp_path


def test_train_and_evaluate_tracked_in_postgres(project: Path, mlflow_pg: MlflowOnPostgres) -> None:
    from mlflow import MlflowClient

    experiment = f"pg-{uuid.uuid4().hex[:8]}"
    model_name = f"pg-tiny-{uuid.uuid4().hex[:6]}"
    settings = [
        *SETTINGS,
        f"tracking.tracking_uri={mlflow_pg.url}",
        f"tracking.experiment={experiment}",
        f"tracking.register_model={model_name}",
    ]
    for stage in ("prepare", "train", "evaluate"):
        code, out = _cli(stage, settings=settings)
        assert code == 0, f"{stage}: {out}"
    train = json.loads((project / "manifests" / "train-pg-tiny.json").read_text())
    ev = json.loads((project / "manifests" / "eval-pg-tiny.json").read_text())
    train_id, eval_id = train["mlflow_run_id"], ev["mlflow_run_id"]
    assert train_id and eval_id and train_id != eval_id
    assert not (project / "work" / "mlflow.db").exists()  # nothing fell back to the embedded SQLite store

    # ---- through the MLflow client
    client = MlflowClient(tracking_uri=mlflow_pg.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {train_id, eval_id}
    tr, er = runs[train_id], runs[eval_id]
    assert tr.info.status == er.info.status == "FINISHED"
    assert tr.data.tags["miroflow.run_name"] == "pg-tiny" and er.data.tags["miroflow.run_name"] == "eval-pg-tiny"
    assert tr.info.run_name.startswith(f"train-pg-tiny-{STEPS}steps-")
    assert tr.data.params["train.steps"] == str(STEPS) and tr.data.params["train.lr"] == "0.001"
    assert "tracking.tracking_uri" not in tr.data.params  # a train run logs data/score/train params only
    with tempfile.TemporaryDirectory() as tmp:  # ... and the whole config as params.yaml
        doc = yaml.safe_load(Path(client.download_artifacts(train_id, "params.yaml", tmp)).read_text())
    assert doc["tracking"]["tracking_uri"] == mlflow_pg.url
    assert er.data.params["eval.steps"] == "2"
    assert tr.data.tags["stage"] == "train" and er.data.tags["stage"] == "evaluate"
    assert er.data.tags["mlflow.parentRunId"] == train_id
    assert "mlflow.parentRunId" not in tr.data.tags
    loss = sorted(client.get_metric_history(train_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, STEPS + 1)), loss
    assert all(m.value == m.value and m.value > 0 for m in loss)  # finite, positive
    assert er.data.metrics["eval/overall"] == pytest.approx(ev["overall"])
    eval_keys = {k for k in er.data.metrics if k.startswith("eval/")}
    assert {f"eval/{c}" for c in ev["accuracy"]} <= eval_keys
    summary = json.loads(Path(client.download_artifacts(eval_id, "eval/summary.json", str(project))).read_text())
    assert summary["overall"] == pytest.approx(ev["overall"])
    assert list(mlflow_pg.artifacts.rglob("summary.json")), "proxied artifacts did not land in the server's root"
    assert client.get_model_version(model_name, "1").run_id == train_id

    # ---- straight from PostgreSQL: the rows are really there
    pg = mlflow_pg.pg
    rows = pg.query(
        DATABASE,
        "SELECT r.run_uuid, r.name, r.status FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id"
        " WHERE e.name = %s ORDER BY r.start_time",
        (experiment,),
    )
    names = {"train": tr.info.run_name, "eval": er.info.run_name}  # unique names: <stage>-<run>-...-<6 hex>
    assert rows == [(train_id, names["train"], "FINISHED"), (eval_id, names["eval"], "FINISHED")]
    parent = pg.query(DATABASE, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'mlflow.parentRunId'", (eval_id,))
    assert parent == [(train_id,)]
    steps = pg.query(
        DATABASE, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss' ORDER BY step", (train_id,)
    )
    assert [s for (s,) in steps] == list(range(1, STEPS + 1))
    eval_rows = pg.query(DATABASE, "SELECT key FROM latest_metrics WHERE run_uuid = %s", (eval_id,))
    assert {k for (k,) in eval_rows} == set(er.data.metrics)
    rows = pg.query(DATABASE, "SELECT key, value FROM params WHERE run_uuid = %s", (train_id,))
    params = {str(k): str(v) for k, v in rows}
    assert params["train.steps"] == str(STEPS)
    versions = pg.query(DATABASE, "SELECT version, run_id FROM model_versions WHERE name = %s", (model_name,))
    assert versions == [(1, train_id)]


# --------------------------------------------------------------------------- bad input


def _error_lines(output: str) -> list[str]:
    """The CLI's ``error:`` lines (the error boundary prints exactly one per failure)."""
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_database_down_under_a_running_server_is_one_error_line_then_recovers(
    project: Path, mlflow_pg: MlflowOnPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops while ``mlflow server`` runs: ``miroflow train`` exits 1 with one line naming the
    server and its 503 (no traceback, no manifest); after PostgreSQL restarts the same server tracks again.

    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``: with MLflow's default (7 retries, backoff 2 s) the same
    failure arrives only after ≈ 4 minutes of silent retrying (4 min 16 s measured against a closed port)."""
    from mlflow import MlflowClient

    experiment = f"pg-down-{uuid.uuid4().hex[:8]}"
    settings = [*SETTINGS, f"tracking.tracking_uri={mlflow_pg.url}", f"tracking.experiment={experiment}"]
    code, out = _cli("prepare", settings=settings)
    assert code == 0, out
    client = MlflowClient(tracking_uri=mlflow_pg.url)
    # The worker builds its store (engine + pool) on its first request; one built while the database is
    # down first retries for ≈ 100 s inside the server, then answers 500. Build it now: an outage then
    # fails pre-ping at once and the server answers 503.
    client.search_experiments(max_results=1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_pg.pg.pause()
    try:
        t0 = time.monotonic()
        code, out = _cli("train", settings=settings)
        elapsed = time.monotonic() - t0
    finally:
        mlflow_pg.pg.resume()
    assert code == 1, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert mlflow_pg.url in errors[0] and "too many 503 error responses" in errors[0], errors[0]
    assert "Traceback" not in out
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"
    assert not (project / "manifests" / "train-pg-tiny.json").exists()
    assert not (project / "work" / "mlflow.db").exists()  # no silent fallback to SQLite

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert client.get_experiment_by_name(experiment) is None  # the failed train created nothing
    exp_id = client.create_experiment(experiment)
    assert client.get_experiment(exp_id).name == experiment  # the server reconnected without a restart


@pytest.mark.slow
def test_postgres_uri_with_nothing_listening_fails_with_one_line_after_mlflow_retries(project: Path) -> None:
    """``tracking.tracking_uri`` straight at a PostgreSQL port with nothing listening (no server in between).

    MLflow's SQLAlchemy store retries the connection 10 times (0.1 s·(2^k − 1) back-off, ≈ 100 s,
    not configurable), logging a warning each time; then the CLI prints one ``error:`` line naming
    the port and ``Connection refused`` and exits 1. Slow because of those retries."""
    port = free_port()  # nothing listens here
    uri = f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    settings = [*SETTINGS, f"tracking.tracking_uri={uri}", "tracking.experiment=pg-closed"]
    code, out = _cli("prepare", settings=settings)
    assert code == 0, out
    t0 = time.monotonic()
    code, out = _cli("train", settings=settings)
    elapsed = time.monotonic() - t0
    assert code == 1, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert f"port {port} failed: Connection refused" in errors[0], errors[0]
    assert "Traceback" not in out
    assert elapsed < 240, f"took {elapsed:.0f}s to fail"
    assert not (project / "manifests" / "train-pg-tiny.json").exists()
