"""A throwaway PostgreSQL server on loopback for tests: ``initdb`` into a temp dir, ``pg_ctl start``.

PostgreSQL refuses to run as root, so when the tests run as root every server command runs as
the ``postgres`` system user (``runuser -u postgres --``) and the data dir is owned by it; as
any other user the commands run directly. The server listens on ``127.0.0.1:<port>`` only (its
Unix socket lives in the temp dir, never in /var/run), trusts local connections for one
superuser (no password anywhere), and is stopped with ``pg_ctl stop -m fast``
(:meth:`PostgresServer.pause`/:meth:`~PostgresServer.resume` stop and restart it on the same data
and port, to test a database outage).

:func:`find_pg_bin` says where the server binaries are (``None`` when PostgreSQL is not
installed: callers skip with that reason); ``.ci/run`` installs PostgreSQL 15 with apt-get.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PG_BIN_ENV", "PostgresServer", "find_pg_bin", "missing_reason"]

#: Environment variable naming a PostgreSQL ``bin`` dir (default: /usr/lib/postgresql/15/bin).
PG_BIN_ENV = "MIROFLOW_PG_BIN"
DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVICE_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The ``bin`` dir holding ``initdb`` and ``pg_ctl`` ($MIROFLOW_PG_BIN, else PostgreSQL 15), or None."""
    candidate = Path(os.environ.get(PG_BIN_ENV) or DEFAULT_PG_BIN)
    if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
        return candidate
    return None


def missing_reason() -> str | None:
    """Why no test server can start here (a sentence for ``pytest.skip``), or None when one can."""
    if find_pg_bin() is None:
        where = os.environ.get(PG_BIN_ENV) or str(DEFAULT_PG_BIN)
        return f"PostgreSQL is not installed ({where}/initdb missing; .ci/run installs postgresql-15 with apt-get)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return f"running as root and there is no '{SERVICE_USER}' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


class PostgresServer:
    """One PostgreSQL cluster in its own temp dir, listening on ``127.0.0.1:port``.

    Use as a context manager (or call :meth:`start`/:meth:`stop`). ``superuser`` is the only
    role (trust auth on loopback); :attr:`root` is removed on :meth:`stop`.
    """

    def __init__(self, port: int, superuser: str = "mlflow") -> None:
        bin_dir = find_pg_bin()
        reason = missing_reason()
        if bin_dir is None or reason is not None:
            raise RuntimeError(f"cannot start PostgreSQL: {reason}")
        self.bin_dir = bin_dir
        self.port = port
        self.superuser = superuser
        self.as_service_user = os.geteuid() == 0
        # Not under pytest's tmp_path: as root that lives in a 0700 root-owned dir the service user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="miroflow-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.postmaster_pid: int | None = None
        if self.as_service_user:
            entry = pwd.getpwnam(SERVICE_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    # ------------------------------------------------------------------ commands

    def _run(self, tool: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``<bin>/<tool> args`` (as the service user when root); raise with its output on failure."""
        cmd = [str(self.bin_dir / tool), *args]
        if self.as_service_user:
            cmd = ["runuser", "-u", SERVICE_USER, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST/PGDATA
        env["LC_ALL"] = "C"
        done = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")
        return done

    def start(self) -> PostgresServer:
        """``initdb`` (trust auth, no fsync) and start the server; returns once it accepts connections."""
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", self.superuser, "-E", "UTF8", "--no-sync")
        self.resume()
        return self

    def resume(self) -> None:
        """``pg_ctl start`` on the existing data dir (same port); waits until it accepts connections."""
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", opts, "-l", str(self.log_path), "-w", "-t", "60", "start")
        self.postmaster_pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def pause(self, timeout_s: float = 30.0) -> None:
        """``pg_ctl stop -m fast`` (data kept; :meth:`resume` starts it again) and wait for the postmaster to exit."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", timeout_s=timeout_s)
        if self.postmaster_pid is not None:
            deadline = time.monotonic() + timeout_s
            while _alive(self.postmaster_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.postmaster_pid):
                raise RuntimeError(f"postmaster {self.postmaster_pid} still running after pg_ctl stop")
            self.postmaster_pid = None

    def stop(self, timeout_s: float = 30.0) -> None:
        """:meth:`pause`, then remove :attr:`root` (data, socket and log)."""
        try:
            self.pause(timeout_s)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ SQL

    def uri(self, database: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy/MLflow URI of ``database`` on this server (user only: trust auth, no password).

        The driver is named: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, not psycopg2.
        """
        return f"postgresql+{driver}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` over TCP (psycopg2, autocommit: it cannot run in a transaction)."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()

    def query(self, database: str, statement: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows of one SQL statement on ``database`` (parameters bound by psycopg2, never formatted in)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
                return list(cur.fetchall())
        finally:
            conn.close()


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0; EPERM means it exists under another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
