"""No plaintext secret in any infra file (env.example holds placeholders only), no secret on a
command line, and every published port binds 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra.infra_checks import (
    COMPOSE,
    INFRA,
    PREFECT_YAML,
    SECRET_NAME,
    command_words,
    env_example_values,
    load_compose,
    port_problems,
    secret_value_problems,
    services,
)

#: What a value in env.example may look like for a secret: an obvious placeholder.
PLACEHOLDER_PREFIXES = ("change-me", "changeme", "<")


def _infra_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name not in ("env.example", ".env")]
    return sorted([*files, PREFECT_YAML])


def test_no_literal_secret_in_infra_files() -> None:
    files = _infra_files()
    assert {COMPOSE, INFRA / "k8s" / "gpu-base-job-template.json", PREFECT_YAML} <= set(files)
    problems = [p for f in files for p in secret_value_problems(f.read_text(), str(f.relative_to(INFRA.parent)))]
    assert problems == []


def test_env_example_has_placeholders_only() -> None:
    secrets = {k: v for k, v in env_example_values().items() if SECRET_NAME.search(k)}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"} <= set(secrets)
    assert {k: v for k, v in secrets.items() if not v.startswith(PLACEHOLDER_PREFIXES)} == {}
    assert not (INFRA / ".env").exists() or ".env" in (INFRA.parent / ".gitignore").read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("    POSTGRES_PASSWORD: hunter2", ["x:1: POSTGRES_PASSWORD has a literal value"]),
        ('  "AWS_SECRET_ACCESS_KEY": "abc",', ["x:1: AWS_SECRET_ACCESS_KEY has a literal value"]),
        ("DB: postgresql://mlflow:hunter2@db/mlflow", ["x:1: a URI with a literal password"]),
        ("    PGPASSWORD: ${POSTGRES_PASSWORD}", []),
        ("    URL: postgresql+asyncpg://${U}:$${PREFECT_API_DATABASE_PASSWORD}@postgres/prefect", []),
        ("    MC_HOST_minio: http://${AWS_ACCESS_KEY_ID}:${AWS_SECRET_ACCESS_KEY}@minio:9000", []),
        ("  - secretRef:", []),
        ("    TOKENIZERS_PARALLELISM: false", []),
        ("# POSTGRES_PASSWORD: in a comment", []),
    ],
)
def test_secret_checker(text: str, expected: list[str]) -> None:
    assert secret_value_problems(text, "x") == expected


def test_no_secret_on_a_command_line() -> None:
    """Commands, entrypoints and healthchecks name no secret (``ps`` and /proc show them to everyone)."""
    for name, svc in services(load_compose()).items():
        words = command_words(svc.get("command")) + command_words(svc.get("entrypoint"))
        if isinstance(svc.get("healthcheck"), dict):
            words += command_words(svc["healthcheck"].get("test"))
        values = {v for k, v in (svc.get("environment") or {}).items() if SECRET_NAME.search(k)}
        assert not [w for w in words if SECRET_NAME.search(w) or any(v and v in w for v in values)], name


def test_ports_bind_loopback_only() -> None:
    compose = load_compose()
    published = [p for svc in services(compose).values() for p in svc.get("ports") or []]
    assert len(published) == 4, published  # MinIO API + console, MLflow, Prefect
    assert port_problems(compose) == []


def test_port_checker_flags_every_interface(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace('"127.0.0.1:5001:5001"', '"5001:5001"'))
    compose = load_compose(broken.read_text())
    compose["services"]["prefect"]["ports"] = [{"target": 4200, "published": 4200, "host_ip": "0.0.0.0"}]
    compose["services"]["minio"]["network_mode"] = "host"
    assert port_problems(compose) == [
        "minio: network_mode host binds every interface of the host",
        "mlflow: port '5001:5001' is not bound to 127.0.0.1",
        "prefect: port {'target': 4200, 'published': 4200, 'host_ip': '0.0.0.0'} is not bound to 127.0.0.1",
    ]
