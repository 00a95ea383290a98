"""``miroflow serve`` as a user runs it (a real subprocess, a real Prefect server, real process workers):
up in under a minute with the cpu/gpu pools and every deployment, Ctrl-C leaves no process behind, bad
options fail in one line; and (slow) the pipeline deployment on the cpu worker dispatches its training
and sweep to the gpu worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from miroflow.serve import READY_LINE, descendants
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
#: The requirement (issue 12): up in < 60 s on 2 (free) cores; measured 24 s with a fresh database at a
#: load average of 4 on this 2-core machine. On a machine busy with other work the budget scales with
#: the load (a load average of 6 on 2 cores: 3 x 60 s).
READY_BUDGET_S = 60.0


def _budget_s() -> float:
    return READY_BUDGET_S * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with the test environment
    psutil = None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Served:
    """A running ``miroflow serve`` and the lines it printed so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> float:
        """Seconds until a line containing ``text`` appeared (fails on exit or timeout)."""
        t0 = time.monotonic()
        while not any(text in x for x in self.lines):
            assert self.proc.poll() is None or any(text in x for x in self.lines), "\n".join(self.lines)
            assert time.monotonic() - t0 < timeout_s, f"no {text!r} within {timeout_s} s:\n" + "\n".join(self.lines)
            time.sleep(0.1)
        return time.monotonic() - t0


def _start(cwd: Path, *args: str) -> Served:
    cmd = [sys.executable, "-m", "miroflow", "serve", "--work-dir", str(cwd / "prefect"), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s = Served(proc)
    threading.Thread(target=s.read, daemon=True).start()
    return s


def _tree(pid: int) -> list[Any]:
    """The process's descendants (psutil processes, or (pid, start) pairs from /proc without psutil)."""
    if psutil is not None:
        return list(psutil.Process(pid).children(recursive=True))
    return list(descendants(pid).items())  # pragma: no cover


def _alive(p: Any) -> bool:
    if psutil is not None:
        try:
            return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False
    return Path(f"/proc/{p[0]}").exists()  # pragma: no cover


def _stop(s: Served, tree: list[Any]) -> tuple[int, float]:
    """Ctrl-C (SIGINT) ``s``; its exit status and seconds until it and all of ``tree`` were gone."""
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    rc = s.proc.wait(timeout=90)
    while any(_alive(p) for p in tree) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    return rc, time.monotonic() - t0


@contextmanager
def _served(cwd: Path, *args: str) -> Iterator[tuple[Served, str]]:
    """``miroflow serve`` on a free port, ready; yields it and its API URL; stopped (SIGINT) after."""
    port = free_port()
    s = _start(cwd, "--port", str(port), *args)
    try:
        s.wait_for(READY_LINE, 240)
        yield s, f"http://127.0.0.1:{port}/api"
    finally:
        if s.proc.poll() is None:
            _stop(s, _tree(s.proc.pid))


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    return httpx.post(f"{api}{path}", json=body, timeout=30).raise_for_status().json()


def test_serve_is_up_within_a_minute_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    port = free_port()
    s = _start(tmp_path, "--port", str(port))
    try:
        took = s.wait_for(READY_LINE, 300)
        s.wait_for("up in ", 10)
        assert READY_LINE in s.lines and f"UI: http://127.0.0.1:{port}" in s.lines  # exact lines (browser test)
        budget = _budget_s()
        assert took < budget, f"ready after {took:.1f} s (budget {budget:.0f} s):\n" + "\n".join(s.lines)
        api = f"http://127.0.0.1:{port}/api"
        pools = {p["name"]: p for p in _post(api, "/work_pools/filter", {})}
        assert {n: (p["type"], p["status"], p["concurrency_limit"]) for n, p in pools.items()} == {
            "cpu": ("process", "READY", None),
            "gpu": ("process", "READY", 1),  # one training per gpu worker
        }
        deps = {d["name"]: d for d in _post(api, "/deployments/filter", {})}
        assert {n: d["work_pool_name"] for n, d in deps.items()} == {
            "miro-pipeline": "cpu",
            "score-dataset": "cpu",
            "evaluate": "cpu",
            "train": "gpu",
            "sweep": "gpu",
            "tts": "gpu",
            "tune-targets": "gpu",
        }
        for d in deps.values():
            assert d["description"] and "miroflow" in d["tags"] and d["enforce_parameter_schema"]
            assert d["entrypoint"].startswith(str(REPO / "flows")), d["entrypoint"]
            assert d["pull_steps"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path.resolve())}}
            ]
        assert deps["miro-pipeline"]["parameters"] == {"dispatch": "deployments"}
        assert deps["train"]["global_concurrency_limit"]["limit"] == 1
        assert deps["train"]["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        form = deps["train"]["parameter_openapi_schema"]["definitions"]["TrainConfig"]["properties"]
        assert form["sample_prompts"]["default"], "list defaults shown in the form"
        tree = _tree(s.proc.pid)
        assert len(tree) >= 3, tree  # server, two workers (and their children)
    finally:
        tree = _tree(s.proc.pid) if s.proc.poll() is None else []
        rc, stop_s = _stop(s, tree)
    assert rc == 0, "\n".join(s.lines)
    assert s.lines[-1] == "miroflow serve: stopped"
    left = [p for p in tree if _alive(p)]
    assert not left, f"left behind after Ctrl-C: {left}"
    load = os.getloadavg()[0]
    print(f"miroflow serve: ready in {took:.1f} s, stopped in {stop_s:.1f} s (load average {load:.1f})")  # -s
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        sock.bind(("127.0.0.1", port))  # the server's port is free again


def test_the_cli_starts_without_the_stage_libraries() -> None:
    """`miroflow serve` (and --help) must not wait for torch/diffusers: the CLI loads stages on first use."""
    code = "import sys, miroflow.cli; print(sorted(m for m in ('torch', 'diffusers', 'open_clip') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    from miroflow import cli, stages

    assert cli.DEMO_MANIFESTS == stages.DEMO_MANIFESTS


@pytest.mark.parametrize("case", ["taken-port", "unknown-pool", "dead-api-url"])
def test_serve_rejects_bad_options_in_one_line(tmp_path: Path, case: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args, expected = {
            "taken-port": (["--port", str(port)], f"error: --port: 127.0.0.1:{port} is already in use"),
            "unknown-pool": (["--pools", "cpu,tpu"], "error: --pools: unknown work pool 'tpu'; use cpu,gpu"),
            "dead-api-url": (
                ["--api-url", f"http://127.0.0.1:{free_port()}/api"],
                "error: --api-url: http://127.0.0.1:",
            ),
        }[case]
        cmd = [sys.executable, "-m", "miroflow", "serve", "--work-dir", str(tmp_path / "prefect"), *args]
        done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(expected) and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_serve_names_a_server_that_never_answers_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "miroflow", "serve", "--port", str(port), "--startup-timeout", "1"]
    cmd += ["--work-dir", str(tmp_path / "prefect")]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the Prefect API not ready within 1 s"), err
    assert str(tmp_path / "prefect" / "logs" / "server.log") in err[0]  # and the tail of that log
    if psutil is not None:  # nothing started for this port or work dir is left running
        mine = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
        assert not mine, mine


@pytest.mark.slow
def test_pipeline_on_the_cpu_worker_dispatches_training_to_the_gpu_worker(tmp_path: Path) -> None:
    overrides = [
        "data.num_samples=32",
        "data.shard_size=16",
        "score.rewards=[sharpness, contrast, shapes_alignment]",
        "score.num_bins=8",
        "train.steps=3",
        "train.batch_size=8",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "train.sample_steps=1",
        "train.warmup_steps=1",
        "train.run_name=disp",
        "eval.prompt_set=shapes:1",
        "eval.images_per_prompt=1",
        "eval.steps=1",
        "tracking.enabled=false",
        "sweep.guidance_scales=[0.0]",
        "sweep.target_values=[0.0]",
        "sweep.best_of_n=[1,2]",
    ]
    with _served(tmp_path) as (s, api):
        dep = httpx.get(f"{api}/deployments/name/miro-pipeline/miro-pipeline", timeout=30).raise_for_status().json()
        body = {"parameters": {"params_file": None, "overrides": overrides}}  # dispatch: the deployment's default
        run = _post(api, f"/deployments/{dep['id']}/create_flow_run", body)
        deadline = time.monotonic() + 900
        while (state := httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).json())["state_type"] not in (
            "COMPLETED",
            "FAILED",
            "CRASHED",
            "CANCELLED",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(2)
        runs = {r["name"]: r for r in _post(api, "/flow_runs/filter", {})}
        logs = {p: (tmp_path / "prefect" / "logs" / f"worker-{p}.log").read_text() for p in ("cpu", "gpu")}
        arts = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        parents = {
            r["id"]: httpx.get(f"{api}/task_runs/{r['parent_task_run_id']}", timeout=30).json()["flow_run_id"]
            for r in runs.values()
            if r["parent_task_run_id"]
        }
    assert state["state_type"] == "COMPLETED", (state["state"], logs["cpu"][-3000:])
    assert state["work_pool_name"] == "cpu"
    # the runs of deployments besides the pipeline's (the score-dataset subflow runs in its process)
    children = {n: r for n, r in runs.items() if r["id"] != run["id"] and r["deployment_id"]}
    assert set(children) == {"train-disp", "train-disp-baseline", "sweep-disp"}, list(runs)
    for name, r in children.items():
        assert (r["state_type"], r["work_pool_name"]) == ("COMPLETED", "gpu"), name
        assert parents[r["id"]] == run["id"], f"{name} is a subflow of the pipeline run"
        submitted = f"submitting flow run '{r['id']}'"
        assert submitted in logs["gpu"] and submitted not in logs["cpu"], name
        assert r["infrastructure_pid"] != state["infrastructure_pid"]
    assert f"submitting flow run '{run['id']}'" in logs["cpu"]
    # the dispatched run got the fully resolved params (nothing to re-resolve: no file, no overrides)
    params = children["train-disp-baseline"]["parameters"]
    assert params["params_file"] is None and params["overrides"] == [] and params["resume"] is True
    assert params["params"]["train"]["rewards"] == [] and params["params"]["train"]["steps"] == 3
    assert params["params"]["data"]["num_samples"] == 32 and params["params"]["tracking"]["enabled"] is False
    summary = next(a for a in arts if a["type"] == "markdown")["data"]
    assert "| dispatch | deployments |" in summary and "| disp sweep points | 4 |" in summary
    table = next(a for a in arts if a["type"] == "table")["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["run"] for r in rows] == [
        "disp",
        "disp-baseline",
        "disp guidance/omega=0",
        "disp target/sharpness=0",
        "disp best_of_n/n=1",
        "disp best_of_n/n=2",
    ]
    assert all("reward/sharpness" in r for r in rows)
