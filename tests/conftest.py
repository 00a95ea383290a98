"""Shared pytest fixtures: a quiet, private environment and real servers on loopback.

- ``_quiet_private_env`` (autouse, session): telemetry off, private ``PREFECT_HOME``.
- ``moto_server`` (session): a real ``moto_server`` S3 endpoint on 127.0.0.1:<free port>;
  sets dummy ``AWS_*`` credentials and ``AWS_ENDPOINT_URL`` for the rest of the session.
- ``s3_bucket``: a fresh, uniquely named bucket on that server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers any HTTP status (or fail after ``timeout_s`` seconds)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s: {last}")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM ``proc`` (by its PID) and SIGKILL it if it does not exit within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@pytest.fixture(scope="session", autouse=True)
def _quiet_private_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No telemetry from MLflow/DVC/Prefect, and a private PREFECT_HOME for this test session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("DO_NOT_TRACK", "1")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a real ``moto_server`` on 127.0.0.1:<free port>; yield its endpoint URL.

    For the rest of the session the environment holds dummy credentials
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` = ``testing``), ``AWS_DEFAULT_REGION=us-east-1``
    and ``AWS_ENDPOINT_URL`` pointing at it; the user's AWS config files are hidden.
    """
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        raise RuntimeError(f"moto_server not found at {exe}; install the 'test' extra (moto[server])")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finaliser
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    )
    mp = pytest.MonkeyPatch()
    try:
        wait_for_http(f"{endpoint}/moto-api/", timeout_s=60, proc=proc)
        missing = str(tmp_path_factory.mktemp("aws") / "none")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_CONFIG_FILE", missing)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
        yield endpoint
    finally:
        mp.undo()
        stop_process(proc)
        log_file.close()


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """Create a fresh bucket with a unique name on the moto server and return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- MLflow server
# (appended for miroflow.tracking tests; the fixtures above are unchanged)


class MlflowServerInfo:
    """A running ``mlflow server``: its URL and where it keeps its data and log."""

    def __init__(self, url: str, db_path: Path, artifacts_dir: Path, log_path: Path) -> None:
        self.url = url
        self.db_path = db_path
        self.artifacts_dir = artifacts_dir
        self.log_path = log_path

    def stored_bytes(self) -> bytes:
        """Everything the server has persisted: the SQLite files, every artifact and its log."""
        chunks: list[bytes] = []
        for p in sorted(self.db_path.parent.glob(self.db_path.name + "*")):
            chunks.append(p.read_bytes())
        for p in sorted(self.artifacts_dir.rglob("*")):
            if p.is_file():
                chunks.append(p.name.encode())
                chunks.append(p.read_bytes())
        if self.log_path.exists():
            chunks.append(self.log_path.read_bytes())
        return b"\n".join(chunks)


@pytest.fixture(scope="session")
def mlflow_server_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServerInfo]:
    """Start a real ``mlflow server`` (SQLite backend, proxied local artifacts) on 127.0.0.1:<free port>.

    Waits for ``/health`` (startup takes 13-34 s) and stops the server (SIGTERM by PID, which
    also stops its workers) in the finaliser.
    """
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        raise RuntimeError(f"mlflow not found at {exe}; install the project with its dependencies")
    root = tmp_path_factory.mktemp("mlflow_server")
    db_path = root / "mlflow.db"
    artifacts = root / "artifacts"
    artifacts.mkdir()
    log_path = root / "mlflow_server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finaliser
    # no job runner: MLflow 3.17 forks it (and its huey consumers) even on SQLite, and SIGTERM to the
    # server leaves them behind; the server also runs in its own session, killed as a group at the end
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db_path}",
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    try:
        wait_for_http(f"{url}/health", timeout_s=120, proc=proc)
        yield MlflowServerInfo(url, db_path, artifacts, log_path)
    finally:
        stop_process(proc, timeout_s=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the server forked
        log_file.close()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_info: MlflowServerInfo) -> str:
    """URL (``http://127.0.0.1:<port>``) of the session's real MLflow tracking server."""
    return mlflow_server_info.url
