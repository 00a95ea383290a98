"""Where runs go (tracking URI, artifact location), git state and file hashes recorded with them."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from miroflow.config import TrackingConfig
from miroflow.storage import InvalidURIError, parse_uri
from miroflow.tracking.redact import redact_text

__all__ = ["default_artifact_location", "resolve_tracking_uri", "absolute_uri", "safe_uri", "git_info", "file_sha256"]

# --------------------------------------------------------------------------- URIs, git, hashes


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments: ``<dir of the db>/mlruns`` for a local ``sqlite:///`` URI.

    ``None`` for anything else (a server decides itself; ``--artifacts-destination``).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///") :]
    if not db or db == ":memory:":
        return None
    db_path = Path("/" + db.lstrip("/")) if tracking_uri.startswith("sqlite:////") else Path(db)
    return (db_path.resolve().parent / "mlruns").as_uri()


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking_uri``, else ``sqlite:///<abs cwd>/work/mlflow.db``.

    The default also creates ``work/`` so SQLite can open the file. Artifacts of experiments created
    on a local SQLite store go to ``<db dir>/mlruns`` (:func:`default_artifact_location`).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    work = Path.cwd().resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute; ``s3://``/``file://`` URIs unchanged."""
    try:
        p = parse_uri(uri)
    except InvalidURIError:
        return uri
    if p.kind == "file" and not p.file_scheme and p.path is not None and not p.path.is_absolute():
        return str(p.path.resolve())
    return uri


def safe_uri(uri: str) -> str:
    return redact_text(uri)


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """``{"git_commit": sha|"unknown", "git_dirty": "true"|"false"|"unknown"}`` for ``cwd``.

    Never raises: no git binary, no repository, or a repository without commits all give
    ``git_commit="unknown"``.
    """

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--verify", "--quiet", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        dirty = "unknown"
    elif commit is None:
        # A repository without commits: everything is uncommitted.
        dirty = "true"
    else:
        dirty = "true" if status else "false"
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def file_sha256(path: str | Path) -> str | None:
    """Hex sha256 of a local file, or ``None`` if it does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
