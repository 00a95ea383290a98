"""prefect.yaml: every entrypoint imports to a real Prefect flow (the one flows/deploy.py serves),
the pools are exactly cpu/gpu with training on gpu and capped at one run, and the parameters are
valid for the flow (Prefect's own parameter schema) and for miroflow (resolve_params)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.infra.infra_checks import DOCKERFILE, PREFECT_YAML, REPO

POOLS = {"cpu", "gpu"}
#: Flows that train or sample many images run on the gpu pool; the rest on cpu (the pipeline too: it
#: dispatches its GPU stages to the gpu pool, docs/control-room.md "Work pools and dispatch").
GPU_DEPLOYMENTS = {"train", "sweep", "tts", "tune-targets"}
TOP_LEVEL_KEYS = {"name", "prefect-version", "build", "push", "pull", "definitions", "deployments"}


def _raw(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text() if text is None else text)


def _rendered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Deployments with ``{{ $VAR }}`` filled in from the environment, as ``prefect deploy`` does."""
    from prefect.utilities.templating import apply_values

    out: list[dict[str, Any]] = []
    for dep in doc["deployments"]:
        rendered = apply_values(copy.deepcopy(dep), dict(os.environ), remove_notset=False)
        assert isinstance(rendered, dict)
        out.append(rendered)
    return out


def prefect_yaml_problems(doc: dict[str, Any]) -> list[str]:
    """What `prefect deploy --all` (or the workers) would trip over, one line per problem."""
    from prefect import Flow
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    out: list[str] = []
    try:
        PrefectYamlModel.model_validate(doc)
    except ValueError as e:
        return [f"prefect.yaml: {e}"]
    out += [f"unknown top-level key {k!r}" for k in sorted(set(doc) - TOP_LEVEL_KEYS)]
    fields = set(DeploymentConfig.model_fields)
    for dep in doc["deployments"]:
        name = dep.get("name", "?")
        out += [f"{name}: unknown key {k!r}" for k in sorted(set(dep) - fields)]
        pool = (dep.get("work_pool") or {}).get("name")
        if pool not in POOLS:
            out.append(f"{name}: work pool {pool!r} is not one of {sorted(POOLS)}")
        elif (pool == "gpu") != (name in GPU_DEPLOYMENTS):
            out.append(f"{name}: runs on pool {pool!r}")
        if not dep.get("description") or not dep.get("tags"):
            out.append(f"{name}: needs a description and tags")
        try:
            flow: Any = load_flow_from_entrypoint(dep["entrypoint"])
        except Exception as e:  # noqa: BLE001 - any import/lookup error is the finding
            out.append(f"{name}: entrypoint {dep.get('entrypoint')!r} does not load: {type(e).__name__}: {e}")
            continue
        if not isinstance(flow, Flow):
            out.append(f"{name}: {dep['entrypoint']} is a {type(flow).__name__}, not a flow")
        elif flow.name != name:
            out.append(f"{name}: the flow is named {flow.name!r}")
    return out


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entrypoints are relative to the project root, as in the image's /opt/miroflow."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))


def test_prefect_yaml_deploys_every_flow() -> None:
    assert prefect_yaml_problems(_raw()) == []


def test_the_deployments_are_the_flows_served_by_deploy_py() -> None:
    from flows.deploy import FLOWS

    assert {d["name"] for d in _raw()["deployments"]} == {f.name for f in FLOWS}


def test_pools_limits_and_working_directory() -> None:
    deployments = {d["name"]: d for d in _raw()["deployments"]}
    assert {d["work_pool"]["name"] for d in deployments.values()} == POOLS
    assert deployments["train"]["work_pool"]["name"] == "gpu"
    assert deployments["miro-pipeline"]["work_pool"]["name"] == "cpu"
    assert deployments["miro-pipeline"]["parameters"]["dispatch"] == "deployments", "never holds the gpu slot"
    assert deployments["train"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    [step] = _raw()["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert directory == "/opt/miroflow" and workdirs.count(directory) == 2, "the image's code dir (cpu, cuda)"


def test_parameters_are_valid_for_each_flow_and_for_miroflow(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    from miroflow.config import resolve_params

    monkeypatch.setenv("MIROFLOW_BUCKET", "team-bucket")
    for dep in _rendered(_raw()):
        params = dep["parameters"]
        assert params["overrides"] == ["storage.root=s3://team-bucket/store"], "{{ $MIROFLOW_BUCKET }} filled in"
        flow: Any = load_flow_from_entrypoint(dep["entrypoint"])
        schema = parameter_schema(flow).model_dump_for_openapi()
        jsonschema.validate(params, schema)
        assert resolve_params(params["params_file"], params["overrides"], None).storage.root.startswith("s3://")


def test_prefect_deploy_forms_show_every_code_default() -> None:
    """The schema `prefect deploy` registers (``parameter_schema`` of the loaded entrypoint, as in
    prefect/cli/deploy/_core.py) gives every config field a default, list and dict fields included."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from pydantic import BaseModel

    import miroflow.config as config
    from miroflow.config import Params

    for dep in _raw()["deployments"]:
        schema = parameter_schema(load_flow_from_entrypoint(dep["entrypoint"])).model_dump_for_openapi()
        sections = {
            name: d
            for name, d in schema["definitions"].items()
            if isinstance(getattr(config, name, None), type) and issubclass(getattr(config, name), BaseModel)
        }
        assert {"TrainConfig", "SweepConfig", "ScoreConfig"} <= set(sections), dep["name"]
        missing = [
            f"{name}.{key}"
            for name, d in sections.items()
            for key, prop in d["properties"].items()
            if "default" not in prop and "$ref" not in prop
        ]
        assert not missing, (dep["name"], missing)
        props = {name: d["properties"] for name, d in sections.items()}
        assert props["TrainConfig"]["sample_prompts"]["default"] == Params().train.sample_prompts
        assert props["SweepConfig"]["best_of_n"]["default"] == Params().sweep.best_of_n
        assert props["ScoreConfig"]["rewards"]["default"] == Params().score.rewards
        assert props["EvalConfig"]["reward_targets"]["default"] == {}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda d: d["deployments"][2].update(entrypoint="flows/train.py:train_task"),
            "train: entrypoint 'flows/train.py:train_task' does not load: MissingFlowError",
        ),
        (
            lambda d: d["deployments"][2].update(entrypoint="flows/train.py:no_such_flow"),
            "train: entrypoint 'flows/train.py:no_such_flow' does not load",
        ),
        (
            lambda d: d["deployments"][2]["work_pool"].update(name="gpus"),
            "train: work pool 'gpus' is not one of ['cpu', 'gpu']",
        ),
        (lambda d: d["deployments"][2]["work_pool"].update(name="cpu"), "train: runs on pool 'cpu'"),
        (lambda d: d["deployments"][1].update(entry_point="x"), "score-dataset: unknown key 'entry_point'"),
    ],
    ids=["a-task", "missing-function", "unknown-pool", "train-on-cpu", "misspelt-key"],
)
def test_a_broken_prefect_yaml_fails(tmp_path: Path, change: Any, problem: str) -> None:
    doc = _raw()
    assert doc["deployments"][2]["name"] == "train" and doc["deployments"][1]["name"] == "score-dataset"
    change(doc)
    broken = tmp_path / "prefect.yaml"
    broken.write_text(yaml.safe_dump(doc))
    problems = prefect_yaml_problems(_raw(broken.read_text()))
    assert any(p.startswith(problem) for p in problems), problems
