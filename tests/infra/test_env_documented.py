"""infra/env.example documents every environment variable that compose, the k8s files, prefect.yaml
and the code use; compose's required ones have a (placeholder) value there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.infra.infra_checks import (
    BASE_JOB_TEMPLATE,
    COMPOSE,
    ENV_EXAMPLE,
    K8S_CONFIG,
    PREFECT_YAML,
    TRAIN_JOB,
    code_env_reads,
    compose_variables,
    env_example_names,
    k8s_env_names,
    k8s_variables,
    load_k8s,
    prefect_env_variables,
    services,
)

#: Set by torchrun for each process (and OMP_NUM_THREADS by miroflow itself): mentioned in
#: env.example's "set for you" section, never set by a user.
TORCHRUN = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS"}


def undocumented(names: set[str], documented: dict[str, bool] | None = None) -> set[str]:
    """The names env.example does not list (as ``NAME=`` or ``# NAME=``)."""
    return names - set(env_example_names() if documented is None else documented)


def test_compose_variables_are_defined_with_a_value() -> None:
    used = compose_variables(COMPOSE.read_text())
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MIROFLOW_BUCKET", "POSTGRES_PASSWORD"} <= used
    required = {name for name, req in env_example_names().items() if req}
    assert used - required == set(), "compose needs a value for each (docker compose fails on an unset one)"


def test_compose_environment_names_we_own_are_documented() -> None:
    """Names the stack's containers get that belong to miroflow's clients, not to one image."""
    env = {k for svc in services(yaml.safe_load(COMPOSE.read_text())).values() for k in (svc.get("environment") or {})}
    ours = {k for k in env if k.startswith(("AWS_", "MIROFLOW_", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    assert ours and undocumented(ours) == set()


def test_k8s_variables_are_documented() -> None:
    docs = [*load_k8s(TRAIN_JOB), *load_k8s(K8S_CONFIG)]
    refs = set().union(*(k8s_variables(d) for d in docs))
    assert refs == {"MIROFLOW_BUCKET"}
    names = set().union(*(k8s_env_names(d) for d in docs))
    assert undocumented(refs | names) == set()
    # a $(VAR) must come from the container's environment: the ConfigMap (or an env entry)
    config = next(d for d in load_k8s(K8S_CONFIG) if d["kind"] == "ConfigMap")
    assert refs <= set(config["data"])
    template = json.loads(BASE_JOB_TEMPLATE.read_text())
    assert undocumented(k8s_env_names(template["job_configuration"]["job_manifest"])) == set()


def test_prefect_yaml_variables_are_documented() -> None:
    used = prefect_env_variables(PREFECT_YAML.read_text())
    assert used == {"MIROFLOW_BUCKET"}
    assert undocumented(used) == set()


def test_every_variable_the_code_reads_is_documented() -> None:
    reads = code_env_reads()
    assert {"MIROFLOW_DEBUG", "MIROFLOW_DASK_HOST", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= reads, reads
    ours = {n for n in reads if n.startswith(("MIROFLOW_", "AWS_", "MLFLOW_", "PREFECT_"))}
    assert undocumented(ours) == set()
    text = ENV_EXAMPLE.read_text()
    assert [name for name in reads & TORCHRUN if name not in text] == [], "torchrun's variables are mentioned"


def test_a_missing_variable_is_reported(tmp_path: Path) -> None:
    """A compose file using an undocumented variable, and code reading a new MIROFLOW_* name, are caught."""
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(COMPOSE.read_text().replace(": ${MIROFLOW_BUCKET}", ": ${MIROFLOW_BUCKETS}", 1))
    assert undocumented(compose_variables(compose.read_text())) == {"MIROFLOW_BUCKETS"}
    code = tmp_path / "src"
    code.mkdir()
    (code / "m.py").write_text(
        'import os\nTIMEOUT_ENV = "MIROFLOW_TIMEOUT"\n'
        'a = os.environ.get(TIMEOUT_ENV)\nb = os.environ["MIROFLOW_ROOT"]\nc = os.getenv("HOME")\n'
    )
    reads = code_env_reads([code])
    assert reads == {"MIROFLOW_TIMEOUT", "MIROFLOW_ROOT", "HOME"}
    assert undocumented({n for n in reads if n.startswith("MIROFLOW_")}) == {"MIROFLOW_TIMEOUT", "MIROFLOW_ROOT"}


@pytest.mark.parametrize(
    ("line", "name", "required"),
    [("AWS_ACCESS_KEY_ID=change-me", "AWS_ACCESS_KEY_ID", True), ("# MIROFLOW_DEBUG=0", "MIROFLOW_DEBUG", False)],
)
def test_env_example_parser(line: str, name: str, required: bool) -> None:
    assert env_example_names(f"# a comment = not a variable\n{line}\n") == {name: required}
