"""Multi-process training from ``miroflow train`` and the train flow: ``torchrun`` when the params ask for it.

:func:`train` is the one entry both use. It trains in this process (:func:`miroflow.stages.train`)
unless ``train.nproc_per_node > 1`` or ``train.nnodes > 1`` and this process is not already a rank of
a torchrun job; then :func:`launch_train` runs (:func:`torchrun_command`)::

    python -m torch.distributed.run --nproc_per_node N --standalone            # one machine
    python -m torch.distributed.run --nproc_per_node N --nnodes M --rdzv_backend c10d \\
        --rdzv_endpoint HOST:PORT --rdzv_id ID --rdzv_conf join_timeout=T      # M machines
      -m miroflow train --params DIR/params.yaml --result DIR/result.json --log-metrics [--resume] [--max-steps K]

``python -m torch.distributed.run`` is the ``torchrun`` console script, run by this interpreter. The
resolved params go in a private temporary folder (mode 0700, file 0600; removed afterwards), never on
the command line; the child inherits the environment (credentials, tracking URI, ``DVC_STAGE``) plus
``MIROFLOW_RUN_TAGS`` holding this process's default MLflow run tags (e.g. the Prefect flow run's), so
the training run is linked as if it ran here. The ranks' output (stdout and stderr together) is read
line by line: rank 0's metric lines (``step N: loss=…``) go to the ``miroflow.tracking.metrics``
logger in the calling thread (where ``flows._records.forward_metrics`` picks them up), every other line
to ``echo``. A failed launch raises :class:`LaunchError` with the exit status and the last lines of
output; a successful one returns the :class:`~miroflow.results.TrainResult` that rank 0 wrote
(``--result``), the same result an in-process training returns. The weights do not depend on the
world size (``miroflow.train``), so these fields are execution-only (``content_keys.TRAIN_EXECUTION_ONLY``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import yaml

from miroflow import stages
from miroflow.checkpoint import run_uri
from miroflow.config import Params
from miroflow.errors import OperationalError
from miroflow.results import TrainResult
from miroflow.tracking import METRICS_LOGGER, default_run_tags
from miroflow.tracking.context import RUN_TAGS_ENV, metrics_handler

__all__ = [
    "LaunchError",
    "METRICS_PREFIX",
    "TAIL_LINES",
    "under_torchrun",
    "should_launch",
    "torchrun_command",
    "child_env",
    "stream_process",
    "launch_train",
    "train",
    "metrics_to_stderr",
]

log = logging.getLogger(__name__)

#: Prefix of the metric lines a launched rank 0 prints (``--log-metrics``); the launcher strips it.
METRICS_PREFIX = "[miroflow.metrics] "
#: Lines of output a :class:`LaunchError` quotes.
TAIL_LINES = 30
#: Seconds the ranks get to stop after SIGTERM when the launcher is interrupted, before SIGKILL.
STOP_GRACE_S = 15.0

Echo = Callable[[str], None]


class LaunchError(OperationalError, RuntimeError):
    """A torchrun launch failed: ``returncode`` is its exit status, ``tail`` its last lines of output."""

    def __init__(self, message: str, returncode: int | None, tail: Sequence[str]) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.tail = list(tail)


def under_torchrun() -> bool:
    """Whether this process is a rank of a distributed job already (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def should_launch(params: Params) -> bool:
    """``train.nproc_per_node > 1`` or ``train.nnodes > 1``, and not already a torchrun rank."""
    tr = params.train
    return (tr.nproc_per_node > 1 or tr.nnodes > 1) and not under_torchrun()


def torchrun_command(
    params: Params,
    params_file: Path,
    result_file: Path,
    resume: bool = False,
    max_steps: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun command line of one training (paths only: no param value but the launch fields).

    Args:
        params: resolved params (``train.nproc_per_node``, ``nnodes``, ``rdzv_endpoint``, ``rdzv_timeout_s``).
        params_file / result_file: the params YAML the ranks load / the TrainResult JSON rank 0 writes.
        resume / max_steps: passed on as ``--resume`` / ``--max-steps``.
        python: interpreter (default: this one).

    Raises:
        ValueError: ``train.nnodes > 1`` without ``train.rdzv_endpoint`` (names the field).
    """
    tr = params.train
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tr.nproc_per_node)]
    if tr.nnodes > 1:
        if not tr.rdzv_endpoint:
            raise ValueError(f"train.rdzv_endpoint: required when train.nnodes > 1 (got nnodes={tr.nnodes})")
        rdzv_id = run_uri(params).rstrip("/").rsplit("/", 1)[-1]  # <run_name>-<hash>: equal on every machine
        cmd += ["--nnodes", str(tr.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", tr.rdzv_endpoint]
        cmd += ["--rdzv_id", rdzv_id, "--rdzv_conf", f"join_timeout={tr.rdzv_timeout_s}"]
    else:
        cmd += ["--standalone"]  # a local rendezvous on a free port
    cmd += ["-m", "miroflow", "train", "--params", str(params_file), "--result", str(result_file), "--log-metrics"]
    if resume:
        cmd.append("--resume")
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: ``base`` (default ``os.environ``) with unbuffered output, ``TQDM_DISABLE=1`` (for
    bars that do not choose themselves), and ``MIROFLOW_RUN_TAGS`` = this process's default MLflow run tags
    (DVC stage, Prefect flow run, ...)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_DISABLE"] = "1"
    tags = default_run_tags()
    if tags:
        env[RUN_TAGS_ENV] = json.dumps(tags, sort_keys=True)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the launch's process group (torchrun and its ranks), SIGKILL after :data:`STOP_GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stream_process(
    cmd: Sequence[str], env: dict[str, str], echo: Echo, cwd: str | None = None
) -> tuple[int, list[str]]:
    """Run ``cmd`` in its own process group, stdout and stderr merged, one line at a time.

    Lines holding :data:`METRICS_PREFIX` go (the text after it) to the ``miroflow.tracking.metrics`` logger
    at INFO when that logger is enabled for INFO (else to ``echo``); of the other lines, ``echo`` gets the
    last ``\r``-separated part (a progress bar's final state). If the caller is interrupted (Ctrl-C, a cancelled flow run)
    the whole group is stopped before the exception propagates.

    Returns:
        ``(exit status, the last TAIL_LINES lines)``.
    """
    metrics = logging.getLogger(METRICS_LOGGER)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # bytes, split at "\n" only (text mode would split at every "\r" too)
            # a progress bar redraws with "\r" and may precede a metric line on the same line: keep the
            # metric (after the last prefix), or else the bar's last state
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            _, is_metric, metric = text.rpartition(METRICS_PREFIX)
            line = metric if is_metric else text.rsplit("\r", 1)[-1]
            tail.append(line)
            if is_metric and metrics.isEnabledFor(logging.INFO):
                metrics.info("%s", line)
            elif line.strip():
                echo(line)
        return proc.wait(), list(tail)
    except BaseException:
        _stop(proc)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def _failure(params: Params, rc: int, tail: list[str]) -> str:
    """The one-paragraph reason of a failed launch, naming the launch fields."""
    tr = params.train
    fields = f"train.nproc_per_node={tr.nproc_per_node}, train.nnodes={tr.nnodes}"
    if tr.nnodes > 1:
        fields += f", train.rdzv_endpoint={tr.rdzv_endpoint}"
    errors = [x.strip() for x in tail if x.strip().startswith("error:")]
    text = "\n".join(tail)
    if errors:
        why = errors[-1]
    elif tr.nnodes > 1 and ("RendezvousTimeoutError" in text or "RendezvousConnectionError" in text):
        why = (
            f"the rendezvous at train.rdzv_endpoint={tr.rdzv_endpoint} did not gather {tr.nnodes} machines within "
            f"train.rdzv_timeout_s={tr.rdzv_timeout_s} s (is the endpoint reachable from every machine, and did "
            "each start this training?)"
        )
    else:
        why = next((x.strip() for x in reversed(tail) if "Error" in x), "see the output below")
    return f"torchrun ({fields}) exited with status {rc}: {why}\nlast output lines:\n" + text


def launch_train(
    params: Params,
    resume: bool = False,
    max_steps: int | None = None,
    echo: Echo | None = None,
    python: str | None = None,
) -> TrainResult:
    """Train under torchrun (:func:`torchrun_command`); returns the TrainResult rank 0 wrote.

    The params are checked here first (:func:`miroflow.stages.preflight`: every problem named before a
    process starts), written to a private temporary file, and removed when the launch ends.

    Args:
        params: resolved params; ``train.nproc_per_node`` ranks per machine on ``train.nnodes`` machines.
        resume / max_steps: as :func:`miroflow.stages.train`.
        echo: receives every non-metric output line (default: this module's logger at INFO).
        python: interpreter of torchrun and the ranks (default: this one).

    Raises:
        PreflightError: bad params (names the fields, e.g. ``train.rdzv_endpoint``).
        LaunchError: torchrun exited non-zero (status, reason and last lines) or rank 0 wrote no result.
    """
    stages.preflight(params, "train")
    if max_steps is not None and max_steps < 1:
        raise stages.PreflightError("train", [f"--max-steps: must be >= 1, got {max_steps}"])
    tmp = Path(tempfile.mkdtemp(prefix="miroflow-launch-"))  # mode 0700
    try:
        params_file, result_file = tmp / "params.yaml", tmp / "result.json"
        fd = os.open(params_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(params.model_dump(mode="json"), f, sort_keys=False)
        cmd = torchrun_command(params, params_file, result_file, resume, max_steps, python)
        tr = params.train
        log.info("launching torchrun: %d process(es) per node on %d node(s)", tr.nproc_per_node, tr.nnodes)
        rc, tail = stream_process(cmd, child_env(), echo or log.info)
        if rc != 0:
            raise LaunchError(_failure(params, rc, tail), rc, tail)
        if not result_file.is_file():
            raise LaunchError(
                f"torchrun exited with status 0 but rank 0 wrote no result ({result_file})\nlast output lines:\n"
                + "\n".join(tail),
                rc,
                tail,
            )
        return TrainResult.from_dict(json.loads(result_file.read_text(encoding="utf-8")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(params: Params, resume: bool = False, max_steps: int | None = None, echo: Echo | None = None) -> TrainResult:
    """Train ``params``: under torchrun when :func:`should_launch`, else in this process (``stages.train``)."""
    if should_launch(params):
        return launch_train(params, resume=resume, max_steps=max_steps, echo=echo)
    return stages.train(params, resume=resume, max_steps=max_steps)


@contextlib.contextmanager
def metrics_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Print this process's metric lines to stderr with :data:`METRICS_PREFIX` (rank 0 of a launch only)."""
    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(METRICS_PREFIX + "%(message)s"))
    handler.setLevel(logging.INFO)
    with metrics_handler(handler):
        yield
