"""infra/: the compose stack is pinned, keeps secrets off command lines and publishes on loopback only.

Docker is not needed: the checks read infra/docker-compose.yml, the MLflow image's Dockerfile,
requirements and entrypoint as text/YAML. Each check is a function returning a list of problems, so
the same functions are also run on a copy of the old, unsafe compose file (they must flag it).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"

#: A secret-looking name (env var or word) in a command line.
SECRET_WORD = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
#: Credentials inside a URI: scheme://user:password@host.
URI_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
#: A floating tag: only a major version (``16``, ``v3``, ``16-alpine``).
FLOATING_TAG = re.compile(r"^v?\d+(-[A-Za-z][\w.]*)?$")
#: Where a pip install's argument list ends in a shell command.
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&", ")", "\\"}
#: pip options that take a value (skipped with it; -r/-c files are checked separately).
PIP_VALUE_OPTS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-t"}
PIP_VALUE_OPTS |= {"--target", "--prefix", "--root", "-f", "--find-links", "--trusted-host", "--progress-bar"}

OLD_COMPOSE = """
services:
  minio:
    image: minio/minio:latest
    command: server /data --console-address :9001
    ports: ["127.0.0.1:9000:9000", "9001:9001"]
  postgres:
    image: postgres:16
    environment: {POSTGRES_PASSWORD: "${POSTGRES_PASSWORD}"}
  mlflow:
    image: ghcr.io/mlflow/mlflow:v3.17.2
    command: >
      sh -c "pip install -q psycopg2-binary boto3 &&
             mlflow server --backend-store-uri postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres/mlflow
             --host 0.0.0.0 --port 5001"
    ports: ["5001:5001"]
  redis:
    image: redis
"""


def _compose(text: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "not a compose file"
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: (svc or {}) for name, svc in compose["services"].items()}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _command_texts(svc: dict[str, Any]) -> dict[str, str]:
    """Everything a service runs as a process argument list: command, entrypoint, healthcheck."""
    out = {"command": _as_text(svc.get("command")), "entrypoint": _as_text(svc.get("entrypoint"))}
    if isinstance(svc.get("healthcheck"), dict):
        out["healthcheck"] = _as_text(svc["healthcheck"].get("test"))
    return {k: v for k, v in out.items() if v}


def image_tag_problems(ref: str) -> list[str]:
    """Problems of one image reference: no tag, ``latest`` or a floating major-only tag."""
    if "@sha256:" in ref:
        return []  # pinned by digest
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{ref}: no tag (means latest)"]
    tag = last.split(":", 1)[1]
    if tag in ("", "latest") or tag.startswith("latest-") or tag.endswith("-latest"):
        return [f"{ref}: latest"]
    if FLOATING_TAG.match(tag):
        return [f"{ref}: floating major-only tag {tag!r}"]
    return []


def image_problems(compose: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, svc in _services(compose).items():
        image = svc.get("image")
        if image is None:
            out.append(f"{name}: no image (a built image without one is tagged latest)")
        else:
            out += [f"{name}: {p}" for p in image_tag_problems(str(image))]
    return out


def secret_command_problems(compose: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, svc in _services(compose).items():
        for field, text in _command_texts(svc).items():
            if SECRET_WORD.search(text):
                out.append(f"{name}.{field}: names a secret ({SECRET_WORD.search(text)[0]!r}): {text!r}")
            if URI_PASSWORD.search(text):
                out.append(f"{name}.{field}: a URI with a password: {text!r}")
    return out


def unpinned_pip_installs(text: str) -> list[str]:
    """Package arguments of every ``pip install`` in a shell text that are not ``name==version``."""
    try:
        tokens = shlex.split(text.replace("\\\n", " ").replace("\n", " ; "), posix=True)
    except ValueError:
        tokens = text.split()
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i].rsplit("/", 1)[-1] in ("pip", "pip3") and i + 1 < len(tokens) and tokens[i + 1] == "install":
            j = i + 2
            while j < len(tokens) and tokens[j] not in SHELL_SEPARATORS:
                tok = tokens[j]
                if tok in PIP_VALUE_OPTS:
                    j += 2
                    continue
                if tok in ("-e", "--editable") or (not tok.startswith("-") and "==" not in tok):
                    out.append(tok)
                j += 1
            i = j
        else:
            # `sh -c "..."` keeps its script as one token: look inside
            if " " in tokens[i] and "pip" in tokens[i]:
                out += unpinned_pip_installs(tokens[i])
            i += 1
    return out


def pip_problems(compose: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, svc in _services(compose).items():
        for field, text in _command_texts(svc).items():
            out += [f"{name}.{field}: unpinned pip install {pkg!r}" for pkg in unpinned_pip_installs(text)]
    return out


def port_problems(compose: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, svc in _services(compose).items():
        if svc.get("network_mode") == "host":
            out.append(f"{name}: network_mode host (binds the host's interfaces)")
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                ok = port.get("host_ip") == "127.0.0.1" and "published" in port
            else:
                parts = str(port).split(":")
                ok = len(parts) == 3 and parts[0] == "127.0.0.1"
            if not ok:
                out.append(f"{name}: port {port!r} is not published on 127.0.0.1")
    return out


def all_problems(compose: dict[str, Any]) -> list[str]:
    return image_problems(compose) + secret_command_problems(compose) + pip_problems(compose) + port_problems(compose)


# ------------------------------------------------------------------------------------------ tests


def test_compose_images_are_pinned() -> None:
    assert image_problems(_compose()) == []


def test_compose_commands_carry_no_secrets() -> None:
    assert secret_command_problems(_compose()) == []


def test_compose_pip_installs_are_pinned() -> None:
    assert pip_problems(_compose()) == []


def test_compose_publishes_on_loopback_only() -> None:
    compose = _compose()
    assert port_problems(compose) == []
    assert any(svc.get("ports") for svc in _services(compose).values())


def test_checks_flag_the_old_compose_file() -> None:
    old = _compose(OLD_COMPOSE)
    assert sorted(image_problems(old)) == [
        "minio: minio/minio:latest: latest",
        "postgres: postgres:16: floating major-only tag '16'",
        "redis: redis: no tag (means latest)",
    ]
    secrets = secret_command_problems(old)
    assert any("POSTGRES_PASSWORD" in p for p in secrets) and any("a URI with a password" in p for p in secrets)
    assert sorted(pip_problems(old)) == [
        "mlflow.command: unpinned pip install 'boto3'",
        "mlflow.command: unpinned pip install 'psycopg2-binary'",
    ]
    assert sorted(port_problems(old)) == [
        "minio: port '9001:9001' is not published on 127.0.0.1",
        "mlflow: port '5001:5001' is not published on 127.0.0.1",
    ]


@pytest.mark.parametrize(
    ("text", "unpinned"),
    [
        ("pip install -q a==1 b==2.0", []),
        ("pip install --no-cache-dir -r req.txt -c constraints.txt x==1 && pip check", []),
        ('sh -c "pip install -q psycopg2-binary boto3==1 && mlflow server"', ["psycopg2-binary"]),
        ("python -m pip install 'a>=1' b", ["a>=1", "b"]),
        ("pip3 install -e .", ["-e", "."]),
        ("pip install --no-cache-dir a==1 \\\n    b && pip check", ["b"]),  # a Dockerfile line continuation
    ],
)
def test_pip_pin_checker(text: str, unpinned: list[str]) -> None:
    assert unpinned_pip_installs(text) == unpinned


def _built_services() -> dict[str, Path]:
    out = {}
    for name, svc in _services(_compose()).items():
        build = svc.get("build")
        if build is not None:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            out[name] = (INFRA / ctx / dockerfile).resolve()
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#", 1)[0].strip().split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_built_images_install_pinned_packages_at_build_time() -> None:
    built = _built_services()
    assert "mlflow" in built, "the MLflow server image is built from infra/mlflow/Dockerfile"
    constraints = _constraints()
    for name, dockerfile in built.items():
        text = dockerfile.read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
        assert bases and all(image_tag_problems(b) == [] for b in bases), (name, bases)
        runs = " ; ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)$", text, flags=re.MULTILINE))
        assert unpinned_pip_installs(runs) == [], (name, runs)
        for req in dockerfile.parent.glob("requirements*.txt"):
            lines = [ln.split("#", 1)[0].strip() for ln in req.read_text().splitlines()]
            for spec in filter(None, lines):
                assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[\w.+!-]+", spec), f"{req}: {spec!r} not pinned"
                pkg, version = spec.split("==")
                key = re.sub(r"[-_.]+", "-", pkg).lower()
                assert constraints.get(key, version) == version, (
                    f"{req}: {spec} but constraints.txt has {key}=={constraints[key]}"
                )
    mlflow_base = re.findall(r"^FROM\s+\S+:v?([\d.]+)", built["mlflow"].read_text(), flags=re.MULTILINE)
    assert mlflow_base == [constraints["mlflow"]], "the MLflow image matches mlflow in constraints.txt"


def test_mlflow_entrypoint_keeps_the_password_off_the_command_line() -> None:
    mlflow = _services(_compose())["mlflow"]
    env = mlflow.get("environment") or {}
    assert env.get("PGPASSWORD") == "${POSTGRES_PASSWORD}", "libpq reads the password from PGPASSWORD"
    script = (_built_services()["mlflow"].parent / "entrypoint.sh").read_text()
    exec_line = script[script.index("exec mlflow server") :]
    assert not SECRET_WORD.search(exec_line) and not URI_PASSWORD.search(exec_line), exec_line
    uri = re.search(r'--backend-store-uri\s+"([^"]+)"', exec_line)
    assert uri and "@" in uri[1] and ":${" not in uri[1].split("@")[0].split("//")[1], uri


def test_env_example_defines_every_variable_the_compose_file_uses() -> None:
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE.read_text()))
    defined = {ln.split("=", 1)[0].strip() for ln in (INFRA / "env.example").read_text().splitlines() if "=" in ln}
    assert used and used <= defined, used - defined
