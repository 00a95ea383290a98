"""The control room in a real browser (issue 12, acceptance): start the pipeline from the Prefect dashboard.

Headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright through ``executable_path``; never
``playwright install``) opens the Prefect UI of a served control room, goes to the ``miro-pipeline``
deployment, opens **Run -> Custom run**, types tiny ``overrides`` into the form (storage on a moto S3 bucket)
and submits. Once the flow run is Completed the test checks, outside the browser:

- the run got exactly the overrides typed in the form (Prefect API);
- MLflow (a real ``mlflow server``): the MIRO and baseline training runs and their evaluation runs, each
  tagged with the flow run's id, name and URL; at least one logged image per training run;
- S3 (boto3 on the moto server): shards, checkpoints and evaluation outputs under ``storage.root``;
- Prefect: the flow run's markdown summary artifact (absolute ``s3://`` URIs, MLflow run ids), also seen in
  the UI's Artifacts tab.

A second test types a bad override into the same form: the run fails and its message names the override.

Screenshots (form filled, run completed, artifacts tab, failures) go to pytest's tmp dir and, when
``$MIROFLOW_TEST_ARTIFACTS`` is set, are copied to ``$MIROFLOW_TEST_ARTIFACTS/control-room/`` together
with the servers' logs; the paths are printed. Skipped, with the reason, where Playwright or Chromium is
missing (``.ci/run`` installs chromium with apt-get; the ``test`` extra brings Playwright).

The control room is started by ONE fixture, :func:`control_room`: ``miroflow serve`` when the CLI has it,
else ``prefect server start`` plus ``python flows/deploy.py`` (what docs/control-room.md describes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

import miroflow
from miroflow.cli import app
from tests.conftest import free_port, wait_for_http

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the `test` extra brings it; without it the tests skip (missing_reason)
    sync_playwright = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[2]
#: Debian's chromium (``apt-get install chromium``); override with $MIROFLOW_CHROMIUM.
CHROMIUM = Path(os.environ.get("MIROFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-gpu",
]
ARTIFACTS_ENV = "MIROFLOW_TEST_ARTIFACTS"
DEPLOYMENT = "miro-pipeline"
RUN = "ui"
#: The deadline of one pipeline run (it takes ~20 s on 2 idle cores once the serving process picks it up).
RUN_TIMEOUT_S = 600.0

#: Typed into the form's ``overrides`` list (onto the served params.yaml): ~20 s of work on 2 cores.
TINY = [
    "data.num_samples=64",
    "data.shard_size=32",
    "score.rewards=[sharpness, contrast, shapes_alignment]",
    "score.num_bins=8",
    "train.steps=3",
    "train.batch_size=8",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "train.sample_steps=1",
    "train.warmup_steps=1",
    "train.log_every=1",
    f"train.run_name={RUN}",
    "eval.prompt_set=shapes:1",
    "eval.images_per_prompt=1",
    "eval.steps=1",
]


def missing_reason() -> str | None:
    """Why the browser cannot run here (a sentence for ``pytest.skip``), or None when it can."""
    if sync_playwright is None:
        return "playwright is not installed (the 'test' extra brings it: pip install -e '.[test]' -c constraints.txt)"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (.ci/run installs Debian's chromium with apt-get; never `playwright install`)"
    return None


_MISSING = missing_reason()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


# --------------------------------------------------------------------------- the served control room


@dataclass
class ControlRoom:
    """A Prefect server (UI + API) on 127.0.0.1 with every miroflow flow served as a deployment."""

    ui_url: str  # http://127.0.0.1:<port>
    api_url: str  # <ui_url>/api
    work_dir: Path  # where the served flows run (params.yaml, manifests/, results)
    logs: list[Path] = field(default_factory=list)


def _has_miroflow_serve() -> bool:
    """Whether this checkout's CLI has ``miroflow serve`` (``miroflow serve --help`` exits 0)."""
    return CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0


#: How the serving process is stopped: Ctrl-C (SIGINT), unless this process ignores SIGINT (a background job
#: of a non-interactive shell), which its children would inherit; then SIGTERM.
STOP_SERVING = signal.SIGTERM if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else signal.SIGINT


@contextlib.contextmanager
def _process(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path, stop: signal.Signals = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own session, output to ``log``; at exit send ``stop`` (SIGTERM after 20 s, SIGKILL
    after 10 more) and kill whatever is left of its process group (flow-run subprocesses, server workers)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, wait_s in ((stop, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float) -> re.Match[str]:
    """The first match of ``pattern`` in ``log`` (polled), or an error with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if m := re.search(pattern, text):
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"no {pattern!r} in {log} within {timeout_s:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def _wait_for_deployment(api_url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll the API until ``miro-pipeline/miro-pipeline`` is registered (or fail after ``timeout_s``)."""
    url = f"{api_url}/deployments/name/{DEPLOYMENT}/{DEPLOYMENT}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {DEPLOYMENT} was served")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(1)
    raise RuntimeError(f"{DEPLOYMENT} not registered at {api_url} within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def control_room(
    moto_server: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlRoom]:
    """The served control room: ``miroflow serve`` if the CLI has it, else ``prefect server start`` +
    ``python flows/deploy.py``; flows run in a fresh work dir (with a copy of params.yaml), track to the
    session's MLflow server and see the moto S3 endpoint and dummy credentials (``AWS_*`` from
    ``moto_server``). Serving stops before the server (``serve()`` hangs if the server is gone first)."""
    root = tmp_path_factory.mktemp("control_room")
    work = root / "work"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    src = Path(miroflow.__file__).resolve().parents[1]  # the miroflow this test imports (a worktree's src)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(src), os.environ.get("PYTHONPATH", "")])),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
        "PYTHONUNBUFFERED": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # serve() polls for new runs every 2 s (default 10)
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # so do workers (miroflow serve)
    }
    for k in ("PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_UI_API_URL"):
        env.pop(k, None)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    with contextlib.ExitStack() as stack:
        if _has_miroflow_serve():
            log = root / "miroflow-serve.log"
            cmd = [str(bin_dir / "miroflow"), "serve", "--host", "127.0.0.1", "--port", str(port)]
            serve = stack.enter_context(_process([*cmd, "--work-dir", str(work)], env, work, log, STOP_SERVING))
            ui = _wait_for_log(log, r"UI: (\S+)", serve, timeout_s=240).group(1).rstrip("/")
            _wait_for_log(log, r"miroflow serve: ready", serve, timeout_s=240)
            room = ControlRoom(ui, f"{ui}/api", work, [log])
        else:
            ui = f"http://127.0.0.1:{port}"
            env |= {"PREFECT_API_URL": f"{ui}/api", "PREFECT_UI_URL": ui}
            server_log, deploy_log = root / "prefect-server.log", root / "deploy.log"
            cmd = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            server = stack.enter_context(_process(cmd, env, work, server_log))
            wait_for_http(f"{ui}/api/health", timeout_s=180, proc=server)
            # entered last, so stopped first
            serve = stack.enter_context(
                _process([sys.executable, str(REPO / "flows" / "deploy.py")], env, work, deploy_log, STOP_SERVING)
            )
            room = ControlRoom(ui, f"{ui}/api", work, [server_log, deploy_log])
        _wait_for_deployment(room.api_url, serve, timeout_s=240)
        yield room


# --------------------------------------------------------------------------- browser helpers


@pytest.fixture
def shots(
    request: pytest.FixtureRequest, tmp_path: Path, control_room: ControlRoom, capsys: pytest.CaptureFixture[str]
) -> Iterator[Path]:
    """Screenshot dir (pytest's tmp dir); copied with the servers' logs to ``$MIROFLOW_TEST_ARTIFACTS/control-room/``
    when that is set. Prints where they are."""
    out = tmp_path / "screenshots"
    out.mkdir()
    yield out
    where = [str(out)]
    if dest_root := os.environ.get(ARTIFACTS_ENV):
        dest = Path(dest_root) / "control-room" / request.node.name
        shutil.rmtree(dest, ignore_errors=True)  # no stale screenshot of an earlier run
        shutil.copytree(out, dest, dirs_exist_ok=True)
        for log in control_room.logs:
            shutil.copy(log, dest / log.name)
        where.append(str(dest))
    with capsys.disabled():
        print(f"\n{request.node.name}: screenshots in {' and '.join(where)}")


@contextlib.contextmanager
def _page(shots: Path) -> Iterator[Page]:
    """A headless Chromium page (1400x1000); a ``failure.png`` screenshot if the block raises."""
    assert sync_playwright is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            try:
                yield page
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shots / "failure.png"), full_page=True)
                raise
        finally:
            browser.close()


def _submit_custom_run(page: Page, ui_url: str, overrides: list[str], shots: Path) -> UUID:
    """Deployments -> miro-pipeline -> Run -> Custom run; type ``overrides`` into the form's list field
    (one "Add item" each), screenshot ``form-filled.png`` and submit. Returns the new flow run's id (from
    the UI's own ``create_flow_run`` request)."""
    page.goto(f"{ui_url}/deployments")
    page.get_by_role("link", name=DEPLOYMENT, exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("link", name="Custom run").click()
    submit = page.get_by_role("button", name="Submit")
    submit.wait_for()
    label = page.locator(".schema-form-property__label", has_text=re.compile(r"^overrides\b"))
    field = page.locator(".schema-form-property").filter(has=label).first
    field.get_by_role("button", name="list", exact=True).click()  # the anyOf [list, None] switch
    for i, text in enumerate(overrides):
        field.get_by_role("button", name="Add item").click()
        field.locator("textarea").nth(i).fill(text)
    page.screenshot(path=str(shots / "form-filled.png"), full_page=True)
    for attempt in range(3):  # a loaded 2-core machine can make the server's SQLite busy: it answers 503
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/create_flow_run")) as resp:
            submit.click()
        if resp.value.status != 503 or attempt == 2:
            break
        time.sleep(3)  # as a person would: the form keeps its values, submit again
    assert resp.value.ok, f"create_flow_run answered {resp.value.status}: {resp.value.text()}"
    return UUID(resp.value.json()["id"])


def _show_run(page: Page, ui_url: str, flow_run_id: UUID, state: str, shot: Path) -> None:
    """Open the flow run's page, wait for its state badge to say ``state`` and screenshot it."""
    page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
    page.locator(".state-badge", has_text=state).first.wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(shot), full_page=True)


# --------------------------------------------------------------------------- API helpers


def _wait_final(api_url: str, flow_run_id: UUID, timeout_s: float) -> FlowRun:
    """Poll the flow run through the Prefect client until its state is final (or fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} not final after {timeout_s:.0f}s: {run.state}")
            time.sleep(2)


def _run_logs(api_url: str, flow_run_id: UUID) -> str:
    """The flow run's log lines (for failure messages)."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(x.message for x in logs)[-5000:]


def _artifacts(api_url: str, flow_run_id: UUID) -> list[Any]:
    """The flow run's Prefect artifacts."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        return list(client.read_artifacts(artifact_filter=flt))


def _mlflow_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact path of an MLflow run (recursive)."""
    out: list[str] = []
    for f in client.list_artifacts(run_id, path):
        out += _mlflow_files(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``s3://bucket/prefix``."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# --------------------------------------------------------------------------- the tests


def test_pipeline_started_from_the_dashboard_form(
    control_room: ControlRoom, mlflow_server: str, moto_server: str, s3_bucket: str, shots: Path
) -> None:
    room = control_room
    root = f"s3://{s3_bucket}/control-room"
    experiment = f"control-room-{uuid.uuid4().hex[:8]}"
    overrides = [*TINY, f"storage.root={root}", f"tracking.experiment={experiment}"]
    with _page(shots) as page:
        flow_run_id = _submit_custom_run(page, room.ui_url, overrides, shots)
        run = _wait_final(room.api_url, flow_run_id, RUN_TIMEOUT_S)
        assert run.state is not None and run.state.is_completed(), (
            f"{run.state}\n{_run_logs(room.api_url, flow_run_id)}"
        )
        _show_run(page, room.ui_url, flow_run_id, "Completed", shots / "run-completed.png")
        page.locator(".p-tab", has_text=re.compile(r"^Artifacts$")).click()  # the run page's tabs
        page.get_by_text(f"pipeline-{RUN}-summary").first.wait_for()
        page.screenshot(path=str(shots / "run-artifacts.png"), full_page=True)
    assert run.parameters["overrides"] == overrides  # what was typed reached the run
    assert run.parameters["params_file"] == "params.yaml"  # the form's default, untouched

    # MLflow: the MIRO and baseline trainings and their evaluations, tagged with the flow run
    tracking = MlflowClient(mlflow_server)
    exp = tracking.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = tracking.search_runs([exp.experiment_id], max_results=200)
    # one MLflow parent run for the pipeline run, every stage run under it (directly or via its training)
    fr_id = str(flow_run_id)
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert parent.data.tags["prefect.flow_run_id"] == fr_id and parent.info.status == "FINISHED"
    for r in runs:  # every run names the Prefect flow run it ran in (the pipeline, or a dispatched train/sweep)
        assert (
            r.data.tags["prefect.flow_run_url"] == f"{room.ui_url}/runs/flow-run/{r.data.tags['prefect.flow_run_id']}"
        )
        if r.data.tags["prefect.flow_run_id"] == fr_id:
            assert r.data.tags["prefect.flow_run_name"] == run.name
    trainings = {r.data.tags["kind"]: r for r in runs if r.data.tags.get("kind") in ("miro", "baseline")}
    assert set(trainings) == {"miro", "baseline"}, [r.data.tags for r in runs]
    assert trainings["miro"].data.tags["run_name"] == RUN
    assert trainings["baseline"].data.tags["run_name"] == f"{RUN}-baseline"
    train_ids = {r.info.run_id for r in trainings.values()}
    for r in trainings.values():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        images = [f for f in _mlflow_files(tracking, r.info.run_id) if f.endswith(".png")]
        assert images, f"no image logged in training run {r.info.run_name}"
        assert "eval/overall" in r.data.metrics  # the training run carries its final evaluation
        if run.parameters.get("dispatch") == "deployments":  # trained by the gpu pool's train deployment
            assert r.data.tags["prefect.flow_name"] == "train" and r.data.tags["prefect.flow_run_id"] != fr_id
    evals = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert len(evals) == 2, [r.info.run_name for r in runs]
    assert all(r.data.tags["eval.checkpoint"].startswith(f"{root}/runs/") for r in evals)
    assert all("eval/overall" in r.data.metrics for r in evals)
    assert all(r.data.tags["mlflow.parentRunId"] in train_ids for r in evals)  # evaluations under their training
    sweeps = [r for r in runs if r.data.tags.get("stage") == "sweep"]  # the sweep + best-of-N of MIRO
    assert len(sweeps) == 1 and sweeps[0].data.tags["mlflow.parentRunId"] == trainings["miro"].info.run_id

    # S3: shards, checkpoints and evaluation outputs of both runs in the moto bucket
    keys = _s3_keys(moto_server, s3_bucket, "control-room/")
    assert any(re.match(r"control-room/shards/.+\.tar$", k) for k in keys), keys[:20]
    for name in (RUN, f"{RUN}-baseline"):
        assert any(re.match(rf"control-room/runs/{name}-[0-9a-f]+/final/ema/model\.safetensors$", k) for k in keys)
        assert any(re.match(rf"control-room/runs/{name}-[0-9a-f]+/checkpoints/step-0+3/", k) for k in keys)
        assert any(re.match(rf"control-room/eval/{name}-[0-9a-f]+/summary\.json$", k) for k in keys), name

    # Prefect: the flow run's markdown summary, with absolute S3 URIs and the MLflow run ids
    arts = {a.key: a for a in _artifacts(room.api_url, flow_run_id)}
    summary = arts.get(f"pipeline-{RUN}-summary")
    assert summary is not None and summary.type == "markdown", sorted(str(k) for k in arts)
    md = str(summary.data)
    for name in (RUN, f"{RUN}-baseline"):  # both runs' checkpoint and evaluation, as absolute S3 URIs
        assert re.search(rf"`{re.escape(root)}/runs/{name}-[0-9a-f]+/[^`]*`", md), md
        assert re.search(rf"`{re.escape(root)}/eval/{name}-[0-9a-f]+/summary\.json`", md), md
    assert trainings["miro"].info.run_id in md and trainings["baseline"].info.run_id in md
    assert f"pipeline-{RUN}-rewards" in arts


def test_bad_override_typed_in_the_form_fails_the_run_naming_it(control_room: ControlRoom, shots: Path) -> None:
    room = control_room
    with _page(shots) as page:
        flow_run_id = _submit_custom_run(page, room.ui_url, ["data.num_samples=64", "train.steps=abc"], shots)
        run = _wait_final(room.api_url, flow_run_id, RUN_TIMEOUT_S)
        assert run.state is not None and run.state.is_failed(), run.state
        _show_run(page, room.ui_url, flow_run_id, "Failed", shots / "run-failed.png")
        page.get_by_text("overrides: train.steps=abc").first.wait_for()  # the run's log, in the UI
    message = f"{run.state.message}\n{_run_logs(room.api_url, flow_run_id)}"
    assert "train.steps=abc" in message, message
    assert json.dumps(run.parameters["overrides"]) == '["data.num_samples=64", "train.steps=abc"]'
