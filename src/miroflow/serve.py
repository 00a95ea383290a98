"""``miroflow serve``: the one-machine control room (docs/control-room.md, "Work pools and dispatch").

Supervises subprocesses, each in its own session (process group), logs under ``<work dir>/logs``:

1. ``prefect server start --host H --port P`` (unless ``--api-url`` or ``PREFECT_API_URL`` names a
   server that answers): the API and the UI, database under ``PREFECT_HOME=<work dir>``;
2. ``flows/deploy.py --pools --workdir <cwd>`` (started at once, it imports the flows while the server
   starts): creates the ``process`` work pools ``cpu`` and ``gpu`` (gpu: one flow run at a time) and
   registers every deployment on its pool, flow runs working in the current directory;
3. one ``prefect worker start --pool <pool> --type process`` per pool of ``--pools``.

When the API answers, the deployments are registered and every pool reports a ready worker, it
prints the lines ``miroflow serve: ready`` and ``UI: <url>``, then waits. Ctrl-C or SIGTERM stops the workers
first (their flow runs, which run in sessions of their own, included), then the server: every
process group is sent SIGTERM, then SIGKILL after a grace period, so nothing is left behind.

This module never imports Prefect (import-linter contract); it talks to the API over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from miroflow.errors import InputError, OperationalError

__all__ = [
    "POOLS",
    "READY_LINE",
    "ServeError",
    "ServeInputError",
    "ServeOptions",
    "descendants",
    "parse_pools",
    "serve",
]

#: The work pools ``miroflow serve`` can start a worker for.
POOLS = ("cpu", "gpu")
#: Printed once everything answers (tests and the browser test wait for it).
READY_LINE = "miroflow serve: ready"
DEFAULT_PORT = 4200
#: Seconds a process group gets between SIGTERM and SIGKILL.
GRACE_S = 10.0
#: How often (seconds) a worker asks the API for flow runs (Prefect's default is 10).
WORKER_QUERY_S = "5"

Echo = Callable[[str], None]


class ServeInputError(InputError, ValueError):
    """A bad ``miroflow serve`` option (taken port, unknown pool, unusable API URL)."""


class ServeError(OperationalError, RuntimeError):
    """A supervised process failed to start or died."""


@dataclass(frozen=True)
class ServeOptions:
    """What ``miroflow serve`` starts.

    Attributes:
        host: the address the server binds (loopback by default).
        port: the server's TCP port; ``None``: 4200 if free, else any free port.
        api_url: an existing Prefect API (``http://host:port/api``) to use instead of starting a server.
        pools: the pools to start a worker for (subset of :data:`POOLS`).
        work_dir: ``PREFECT_HOME`` (database, results) and ``logs/``.
        run_dir: the working directory of every flow run (relative params paths resolve there).
        startup_timeout_s: seconds to wait for each of: API healthy, deployments registered, workers ready.
    """

    host: str = "127.0.0.1"
    port: int | None = None
    api_url: str | None = None
    pools: tuple[str, ...] = POOLS
    work_dir: Path = Path("work/prefect")
    run_dir: Path = field(default_factory=Path.cwd)
    startup_timeout_s: float = 180.0


def parse_pools(text: str) -> tuple[str, ...]:
    """``"cpu,gpu"`` -> ``("cpu", "gpu")``.

    Raises:
        ServeInputError: an empty list or a pool that is not one of :data:`POOLS` (named).
    """
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in POOLS]
    if bad or not names:
        raise ServeInputError(
            f"--pools: unknown work pool {', '.join(map(repr, bad)) or '(none)'}; use {','.join(POOLS)}"
        )
    return names


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(host: str, port: int | None) -> int:
    """``port`` if free (else :class:`ServeInputError`); ``None``: 4200 if free, else a free one."""
    if port is not None:
        if not 0 < port < 65536:
            raise ServeInputError(f"--port: {port} is not a TCP port (1-65535)")
        if not port_free(host, port):
            raise ServeInputError(f"--port: {host}:{port} is already in use; pick another port or leave --port out")
        return port
    if port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout_s: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - http(s) URL of the Prefect API
        return json.loads(r.read().decode() or "null")


def api_healthy(api_url: str) -> bool:
    """Whether ``<api_url>/health`` answers ``true``."""
    try:
        return _get_json(f"{api_url.rstrip('/')}/health") is True
    except (OSError, ValueError):
        return False


def pool_ready(api_url: str, pool: str) -> bool:
    """Whether the work pool reports status ``READY`` (a worker is polling it)."""
    try:
        return (_get_json(f"{api_url.rstrip('/')}/work_pools/{pool}") or {}).get("status") == "READY"
    except (OSError, ValueError):
        return False


def code_root() -> Path:
    """The checkout whose ``flows/deploy.py`` registers the deployments (this package's, else the cwd's).

    Raises:
        ServeInputError: neither has ``flows/deploy.py`` (an installed package without its checkout).
    """
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "flows" / "deploy.py").is_file():
            return root
    raise ServeInputError(
        "flows/deploy.py not found next to miroflow nor in the current directory: run from a checkout"
    )


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start time in clock ticks)`` of ``pid`` from /proc, ``None`` if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``: ``{pid: start time}`` (the start time tells a reused PID apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
                starts[int(entry.name)] = st[1]
    out: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in out and p in starts:
            out[p] = starts[p]
            todo += children.get(p, [])
    return out


def _alive(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] == start


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if ``miroflow serve`` itself dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    """One supervised process (its own session) and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    _log_file: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of its log, joined by " | " (for one-line errors)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip()) or "(empty log)"

    def close(self) -> None:
        """Reap the process and close its log (after :func:`stop_all`)."""
        try:
            self.proc.wait(timeout=GRACE_S)
        finally:
            self._log_file.close()


def stop_all(children: list[Child], grace_s: float = GRACE_S) -> None:
    """Stop ``children`` together: SIGTERM each process group, wait up to ``grace_s`` for every process of
    their trees (descendants in sessions of their own too, e.g. a worker's flow runs), SIGKILL what is left."""
    trees: dict[int, int] = {}
    for c in children:
        trees.update(descendants(c.proc.pid))
        if c.proc.poll() is None:
            _signal_group(c.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        running = [c for c in children if c.proc.poll() is None]
        for c in running:
            trees.update(descendants(c.proc.pid))
        if not running and not any(_alive(p, s) for p, s in trees.items()):
            break
        time.sleep(0.1)
    for c in children:
        if c.proc.poll() is None:
            _signal_group(c.proc.pid, signal.SIGKILL)
    for p, s in trees.items():
        if _alive(p, s):
            _signal_group(p, signal.SIGKILL)
            _kill(p, signal.SIGKILL)
    for c in children:
        c.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Child:
    log = logs / f"{name}.log"
    f = log.open("ab")
    f.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    f.flush()
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=f,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )
    return Child(name, proc, log, f)


class _Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler to unwind into the shutdown."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the supervisor


def child_env(api_url: str, ui_url: str, work_dir: Path, root: Path) -> dict[str, str]:
    """The environment of every supervised process: this one's, plus the API, ``PREFECT_HOME`` and the code."""
    env = dict(os.environ)
    src = [str(root / "src")] if (root / "src" / "miroflow").is_dir() else []
    env["PYTHONPATH"] = os.pathsep.join([*src, str(root), *filter(None, [env.get("PYTHONPATH")])])
    env |= {
        "PREFECT_HOME": str(work_dir),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_URL": ui_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_S)
    return env


def _ui_of(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def _wait(what: str, ok: Callable[[], bool], timeout_s: float, watch: list[Child], blame: Child | None) -> None:
    """Poll ``ok`` until true; fail naming ``what`` (with ``blame``'s log tail) on timeout or a dead child."""
    deadline = time.monotonic() + timeout_s
    while not ok():
        for c in watch:
            if c.proc.poll() is not None and not (c.name == "deploy" and c.proc.returncode == 0):
                raise ServeError(f"{c.name} exited with status {c.proc.returncode} ({c.log}): {c.tail()}")
        if time.monotonic() > deadline:
            where = f" ({blame.log}): {blame.tail()}" if blame is not None else ""
            raise ServeError(f"{what} not ready within {timeout_s:.0f} s{where}")
        time.sleep(0.25)


def serve(opts: ServeOptions, echo: Echo = print) -> int:
    """Start (or reuse) the server, register the deployments, start the workers; run until Ctrl-C/SIGTERM.

    Returns:
        0 after a clean shutdown.

    Raises:
        ServeInputError: a bad option (taken port, unknown pool, an ``--api-url`` that does not answer).
        ServeError: a process failed to start or died (its log's tail in the message).
    """
    pools = parse_pools(",".join(opts.pools))
    root = code_root()
    work_dir = opts.work_dir.resolve()
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_dir = opts.run_dir.resolve()
    t0 = time.monotonic()
    env_api = os.environ.get("PREFECT_API_URL")
    if opts.api_url:
        if not api_healthy(opts.api_url):
            raise ServeInputError(f"--api-url: {opts.api_url}/health does not answer true (is the server up?)")
        api_url, port = opts.api_url.rstrip("/"), None
    elif env_api and opts.port is None and api_healthy(env_api):
        api_url, port = env_api.rstrip("/"), None
        echo(f"using the Prefect server of PREFECT_API_URL={api_url}")
    else:
        port = choose_port(opts.host, opts.port)
        api_url = f"http://{opts.host}:{port}/api"
    ui_url = _ui_of(api_url)
    env = child_env(api_url, ui_url, work_dir, root)
    py = sys.executable
    children: list[Child] = []
    try:
        with _stop_on_signals():
            server = None
            if port is not None:
                cmd = [py, "-m", "prefect", "server", "start", "--host", opts.host, "--port", str(port)]
                server = _spawn("server", cmd, env, logs, run_dir)
                children.append(server)
            deploy_cmd = [py, str(root / "flows" / "deploy.py"), "--pools", "--workdir", str(run_dir)]
            deploy_cmd += ["--timeout", str(opts.startup_timeout_s)]
            deploy = _spawn("deploy", deploy_cmd, env, logs, run_dir)
            children.append(deploy)
            echo(f"miroflow serve: starting ({'server on ' + ui_url if server else 'API ' + api_url}; logs {logs})")
            _wait("the Prefect API", lambda: api_healthy(api_url), opts.startup_timeout_s, children, server)
            workers = []
            for pool in pools:
                cmd = [py, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
                cmd += ["--name", f"{pool}-{socket.gethostname()}-{os.getpid()}"]
                workers.append(_spawn(f"worker-{pool}", cmd, env, logs, run_dir))
            children += workers
            _wait("deployments", lambda: deploy.proc.poll() == 0, opts.startup_timeout_s, children, deploy)
            for w, pool in zip(workers, pools, strict=True):
                ready = _pool_check(api_url, pool)
                _wait(f"work pool {pool}'s worker", ready, opts.startup_timeout_s, children, w)
            echo(READY_LINE)
            echo(f"UI: {ui_url}")
            echo(f"up in {time.monotonic() - t0:.1f} s; workers for {', '.join(pools)}; flow runs work in {run_dir}")
            while True:
                for c in children:
                    if c.name != "deploy" and c.proc.poll() is not None:
                        raise ServeError(f"{c.name} exited with status {c.proc.returncode} ({c.log}): {c.tail()}")
                time.sleep(0.5)
    except _Stop as s:
        echo(f"miroflow serve: {s}, stopping")
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave half the processes
        try:
            stop_all([c for c in children if c.name != "server"])  # workers (and their flow runs) first
            stop_all([c for c in children if c.name == "server"])
        finally:
            signal.signal(signal.SIGINT, old)
    echo("miroflow serve: stopped")
    return 0


def _pool_check(api_url: str, pool: str) -> Callable[[], bool]:
    return lambda: pool_ready(api_url, pool)
