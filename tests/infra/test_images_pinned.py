"""Every image the infra runs is pinned (a release tag that is not ``latest``, or a digest), and the
project image (infra/Dockerfile) is built the way docs/infra.md says: cpu and cuda targets, pinned
packages from constraints.txt, a non-root user, no secret baked in, nothing outside the context."""

from __future__ import annotations

import fnmatch
import re

import pytest

from tests.infra.infra_checks import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    SECRET_NAME,
    all_image_refs,
    dockerfile_base_images,
    dockerfile_stages,
    image_pin_problem,
)


def test_every_image_is_pinned() -> None:
    refs = all_image_refs()
    assert all(refs.values()), {k: v for k, v in refs.items() if not v}
    problems = [f"{where}: {p}" for where, images in refs.items() for p in map(image_pin_problem, images) if p]
    assert problems == []


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("minio/minio", "minio/minio: no tag (means latest)"),
        ("minio/minio:latest", "minio/minio:latest: latest"),
        ("prefecthq/prefect:3-latest", "prefecthq/prefect:3-latest: latest"),
        ("postgres:16", "postgres:16: floating tag '16' (only a major version)"),
        ("prefecthq/prefect:3-python3.11-kubernetes", "prefecthq/prefect:3-python3.11-kubernetes: floating tag"),
        ("localhost:5000/miroflow", "localhost:5000/miroflow: no tag (means latest)"),
        ("${IMAGE}", "${IMAGE}: a variable, not a pinned image"),
        ("{{ image }}", "{{ image }}: a variable, not a pinned image"),
        ("postgres:16.10", None),
        ("nvidia/cuda:13.0.1-base-ubuntu24.04", None),
        ("localhost:5000/miroflow:0.1.0-cpu", None),
        ("busybox@sha256:" + "ab" * 32, None),
    ],
)
def test_pin_checker(ref: str, problem: str | None) -> None:
    got = image_pin_problem(ref)
    assert (got is None) == (problem is None), got
    if problem is not None:
        assert got is not None and got.startswith(problem), got


def test_an_unpinned_from_line_is_caught() -> None:
    text = DOCKERFILE.read_text()
    floating = text.replace("FROM python:3.11.14-slim-bookworm AS cpu", "FROM python:3-slim AS cpu")
    assert "python:3-slim: floating tag '3-slim' (only a major version)" in map(
        image_pin_problem, dockerfile_base_images(floating)
    )
    latest = text.replace("nvidia/cuda:13.0.1-base-ubuntu24.04", "nvidia/cuda")
    assert "nvidia/cuda: no tag (means latest)" in map(image_pin_problem, dockerfile_base_images(latest))


def _stage_text(target: str) -> str:
    """The lines of one Dockerfile stage."""
    parts = re.split(r"^(?=FROM\s)", DOCKERFILE.read_text(), flags=re.M)
    [stage] = [p for p in parts if re.match(rf"FROM\s+\S+\s+AS\s+{target}\s*$", p.splitlines()[0], flags=re.I)]
    return stage


def _constraint(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==", 1)[1].strip()
    raise KeyError(name)


def test_dockerfile_has_cpu_and_cuda_targets() -> None:
    stages = dict((alias, image) for image, alias in dockerfile_stages())
    assert {"cpu", "cuda"} <= set(stages)
    assert stages["cuda"].startswith("nvidia/cuda:") and image_pin_problem(stages["cuda"]) is None
    assert "whl/cu" in re.search(r"ARG TORCH_INDEX_URL=(\S+)", _stage_text("cuda"))[1]  # type: ignore[index]
    assert re.search(r"ARG TORCH_INDEX_URL=\S+/whl/cpu$", _stage_text("cpu"), flags=re.M)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_each_target_installs_pinned_packages_as_a_non_root_user(target: str) -> None:
    stage = _stage_text(target)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M)[1]  # type: ignore[index]
    assert f"ARG MIROFLOW_VERSION={version}" in stage, "the image installs this checkout's version"
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={_constraint(pkg)}" in stage, f"{pkg} as pinned in constraints.txt"
    assert "-c /opt/miroflow/constraints.txt" in stage and '--extra-index-url "${TORCH_INDEX_URL}"' in stage
    assert "--no-index --no-deps --find-links /wheels miroflow==${MIROFLOW_VERSION}" in stage
    assert "pip check" in stage
    users = re.findall(r"^USER\s+(\S+)", stage, flags=re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r"^CMD \[\"miroflow\"", stage, flags=re.M)
    assert not re.search(r"^ENTRYPOINT", stage, flags=re.M), "workers and Jobs pass their own command"


def test_no_secret_is_baked_into_the_image() -> None:
    text = DOCKERFILE.read_text()
    for m in re.finditer(r"^(?:ENV|ARG)\s+(.+?)(?<!\\)$", text, flags=re.M | re.S):
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", m[1]) or [m[1].split()[0]]
        assert not [n for n in names if SECRET_NAME.search(n)], m[0]
    assert not re.search(r"^COPY\s+.*\.env\b", text, flags=re.M)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins (``!`` re-includes)."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat == "**" or fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_secret() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources: list[str] = []
    for m in re.finditer(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE.read_text(), flags=re.M):
        sources += m[1].split()[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    for secret in ("infra/.env", ".venv", "work", ".git", ".dvc/config.local"):
        assert _ignored(secret, patterns), secret
