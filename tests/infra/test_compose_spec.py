"""infra/docker-compose.yml against the compose specification (JSON schema, offline) and the
structure the stack needs: bucket init, two databases, Prefect on Postgres, cpu/gpu workers in the
project image, a GPU reservation, and a one-shot deploy of prefect.yaml. Broken copies fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.infra_checks import (
    COMPOSE,
    INFRA,
    command_words,
    compose_schema,
    compose_schema_problems,
    dockerfile_stages,
    env_example_values,
    load_compose,
    services,
)


def _stack() -> dict[str, dict[str, Any]]:
    return services(load_compose())


def test_the_vendored_compose_schema_is_the_compose_spec() -> None:
    schema = compose_schema()
    assert schema["$schema"].startswith("https://json-schema.org/draft/")
    assert {"services", "volumes", "networks"} <= set(schema["properties"])


def test_compose_file_matches_the_compose_spec() -> None:
    assert compose_schema_problems(load_compose()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # a misspelt service key
        (
            "    environment: *project-env\n    # manifests/",
            "    enviroment: *project-env\n    # manifests/",
            "enviroment",
        ),
        # a list where the spec wants a mapping/number: GPU count as a list
        ("              count: all", "              count: [all]", "count"),
        # ports as one string instead of a list
        ('    ports: ["127.0.0.1:4200:4200"]', '    ports: "127.0.0.1:4200:4200"', "ports"),
    ],
    ids=["misspelt-key", "wrong-type", "ports-not-a-list"],
)
def test_a_broken_compose_file_fails(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = COMPOSE.read_text()
    assert old in text, old
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    problems = compose_schema_problems(load_compose(broken.read_text()))
    assert problems and any(expected in p for p in problems), problems


def test_interpolation_fails_on_an_unset_variable() -> None:
    env = dict(env_example_values())
    del env["MIROFLOW_BUCKET"]
    with pytest.raises(KeyError, match="MIROFLOW_BUCKET"):
        load_compose(env=env)


def test_services_of_the_stack() -> None:
    assert set(_stack()) == {
        "minio",
        "bucket-init",
        "postgres",
        "mlflow",
        "prefect",
        "worker-cpu",
        "worker-gpu",
        "deploy",
    }


def test_bucket_init_creates_the_bucket_once_minio_answers() -> None:
    svc = _stack()["bucket-init"]
    assert svc["image"].startswith("minio/mc:")
    script = " ".join(command_words(svc["command"]))
    assert "mc ready minio" in script and 'mc mb --ignore-existing "minio/${MIROFLOW_BUCKET}"' in script
    assert svc["environment"]["MC_HOST_minio"] == "http://change-me:change-me-too@minio:9000"
    assert svc["environment"]["MIROFLOW_BUCKET"] == "miroflow"
    # everything that needs the bucket waits for the job to have succeeded
    for name in ("mlflow", "worker-cpu", "worker-gpu"):
        assert _stack()[name]["depends_on"]["bucket-init"] == {"condition": "service_completed_successfully"}


def test_postgres_holds_both_databases() -> None:
    stack = _stack()
    pg = stack["postgres"]
    assert pg["environment"]["POSTGRES_DB"] == "mlflow"
    [init] = [v for v in pg["volumes"] if v.endswith("/docker-entrypoint-initdb.d:ro")]
    init_dir = (INFRA / init.split(":", 1)[0]).resolve()
    sql = " ".join(p.read_text() for p in sorted(init_dir.glob("*.sql")))
    assert "CREATE DATABASE prefect;" in sql
    url = stack["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == "postgresql+asyncpg://mlflow:${PREFECT_API_DATABASE_PASSWORD}@postgres:5432/prefect"
    assert stack["prefect"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready -h 127.0.0.1" in " ".join(pg["healthcheck"]["test"])


def test_prefect_server_settings_resolve_to_the_postgres_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's own settings model, fed the compose environment, yields the URL with the password
    put in, and every PREFECT_* name in the stack is a real Prefect setting."""
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect.settings.models.root import Settings

    stack = _stack()
    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    for key, value in stack["prefect"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.server.database.connection_url is not None
    assert (
        settings.server.database.connection_url.get_secret_value()
        == "postgresql+asyncpg://mlflow:change-me@postgres:5432/prefect"
    )
    valid = _get_valid_setting_names(Settings)
    used = {k for svc in stack.values() for k in (svc.get("environment") or {}) if k.startswith("PREFECT_")}
    assert used and used <= valid, used - valid


@pytest.mark.parametrize(("name", "pool", "target"), [("worker-cpu", "cpu", "cpu"), ("worker-gpu", "gpu", "cuda")])
def test_workers_run_the_project_image(name: str, pool: str, target: str) -> None:
    svc = _stack()[name]
    words = command_words(svc["command"])
    assert words[:3] == ["prefect", "worker", "start"]
    assert words[words.index("--pool") + 1] == pool and words[words.index("--type") + 1] == "process"
    build = svc["build"]
    assert (build["context"], build["dockerfile"], build["target"]) == ("..", "infra/Dockerfile", target)
    assert target in {alias for _, alias in dockerfile_stages()}, f"infra/Dockerfile has no target {target}"
    assert svc["image"].endswith(f"-{target}")
    env = svc["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5001"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "manifests:/opt/miroflow/manifests" in svc["volumes"], "both workers see the same manifests/"


def test_gpu_worker_reserves_the_nvidia_gpus() -> None:
    svc = _stack()["worker-gpu"]
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert svc["profiles"] == ["gpu"], "a CPU-only host can still `docker compose up`"
    assert "--limit" in command_words(svc["command"])


def test_deploy_job_registers_prefect_yaml_on_both_pools() -> None:
    svc = _stack()["deploy"]
    script = " ".join(command_words(svc["entrypoint"]) + command_words(svc["command"]))
    assert "prefect work-pool create cpu --type process" in script
    assert "prefect work-pool create gpu --type process" in script
    assert "prefect work-pool set-concurrency-limit gpu 1" in script
    assert "prefect deploy --all --no-prompt --prefect-file prefect.yaml" in script
    assert svc["depends_on"]["prefect"] == {"condition": "service_healthy"}
    assert svc["restart"] == "no"
    assert svc["environment"]["MIROFLOW_BUCKET"] == "miroflow", "{{ $MIROFLOW_BUCKET }} in prefect.yaml"


def test_mlflow_image_is_built_with_its_drivers_and_no_password_argument() -> None:
    svc = _stack()["mlflow"]
    assert svc["build"] == "./mlflow" and "command" not in svc
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["environment"]
    assert raw["PGPASSWORD"] == "${POSTGRES_PASSWORD}"
    requirements = (INFRA / "mlflow" / "requirements.txt").read_text()
    assert "psycopg2-binary==" in requirements and "boto3==" in requirements
