"""infra/k8s/: every manifest is a valid Kubernetes resource (offline schemas, strict), the Prefect
base job template renders to a valid GPU Job through prefect-kubernetes, the training Job runs the
real ``torchrun ... -m miroflow train`` with as many processes as GPUs, and broken copies fail."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import yaml

from tests.infra.infra_checks import (
    BASE_JOB_TEMPLATE,
    HELM_VALUES,
    K8S,
    K8S_CONFIG,
    PREFECT_POD_SPEC_EXTRAS,
    TRAIN_JOB,
    container_specs,
    k8s_problems,
    load_k8s,
    render_base_job_template,
    strip_prefect_pod_extras,
)

MANIFEST_FILES = [TRAIN_JOB, K8S_CONFIG]


@pytest.fixture(autouse=True)
def _cluster_api_url() -> Iterator[None]:
    """A Prefect API URL, as the in-cluster worker has: rendering then needs no temporary server.

    Set through Prefect's settings context (its settings are read once, at import).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://prefect-server.miroflow.svc.cluster.local:4200/api"}):
        yield


def _template() -> dict[str, Any]:
    return json.loads(BASE_JOB_TEMPLATE.read_text())


def test_every_k8s_file_is_known() -> None:
    """New files under infra/k8s/ must be added to the checks (manifests here, values/template elsewhere)."""
    checked = {*MANIFEST_FILES, BASE_JOB_TEMPLATE, HELM_VALUES}
    assert {p for p in K8S.iterdir() if p.is_file()} == checked


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifests_validate_strictly(path: Path) -> None:
    docs = load_k8s(path)
    assert docs
    for doc in docs:
        assert k8s_problems(doc, strict=True) == [], doc.get("kind")


def test_a_broken_job_fails_validation(tmp_path: Path) -> None:
    """A wrong field type and a misspelt field, each written to a file and read back, are rejected."""
    text = TRAIN_JOB.read_text()
    wrong_type = tmp_path / "wrong-type.yaml"
    wrong_type.write_text(text.replace("backoffLimit: 0", 'backoffLimit: "none"', 1))
    [problem] = k8s_problems(load_k8s(wrong_type)[0])
    assert problem == "Job/miroflow-train: spec/backoffLimit: 'none' is not of type 'integer', 'null'"

    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("restartPolicy: Never", "restartPolicyy: Never", 1))
    [problem] = k8s_problems(load_k8s(typo)[0])
    assert "restartPolicyy" in problem and "spec/template/spec" in problem

    gpu_as_list = tmp_path / "gpu-list.yaml"
    gpu_as_list.write_text(text.replace('cpu: "32"', "cpu: [32]", 1))
    assert k8s_problems(load_k8s(gpu_as_list)[0]) != []


def _train_container() -> dict[str, Any]:
    [job] = load_k8s(TRAIN_JOB)
    [container] = container_specs(job)
    return container


def test_training_job_runs_torchrun_with_one_process_per_gpu() -> None:
    c = _train_container()
    words = [*c["command"], *c["args"]]
    assert words[0] == "torchrun"
    nproc = [w.split("=", 1)[1] for w in words if w.startswith("--nproc_per_node=")]
    assert len(nproc) == 1 and nproc[0].isdigit(), words
    gpus = int(nproc[0])
    assert gpus >= 2, "a multi-GPU job"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    module = words.index("-m")
    assert words[module + 1 : module + 3] == ["miroflow", "train"]
    assert "--standalone" in words[:module], "torchrun options come before the module"


def test_training_job_command_is_a_real_miroflow_train_invocation() -> None:
    """The options after ``-m miroflow train`` exist in the CLI and the -S overrides are valid params."""
    from miroflow.cli import app
    from miroflow.config import resolve_params

    words = _train_container()["args"]
    train_args = words[words.index("train") + 1 :]
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    known = {opt for p in command.params for opt in p.opts}
    overrides: list[str] = []
    i = 0
    while i < len(train_args):
        word = train_args[i]
        assert word in known, f"miroflow train has no option {word!r}"
        if word in ("-S", "--set"):
            overrides.append(train_args[i + 1])
            i += 2
        else:
            i += 1
    assert "--resume" in train_args, "an evicted Job carries on from its newest checkpoint"
    # $(MIROFLOW_BUCKET) is expanded by Kubernetes from the ConfigMap; any bucket name will do here
    expanded = [re.sub(r"\$\((\w+)\)", "bucket", o) for o in overrides]
    params = resolve_params("params.yaml", expanded, None)
    assert params.storage.root == "s3://bucket/store"
    assert params.train.device == "cuda"


def test_training_job_takes_secrets_from_a_secret_only() -> None:
    c = _train_container()
    refs = c["envFrom"]
    assert {"secretRef": {"name": "miroflow-env"}} in refs
    assert all("value" not in e or not re.search(r"KEY|SECRET|PASSWORD|TOKEN", e["name"]) for e in c.get("env", []))
    [job] = load_k8s(TRAIN_JOB)
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    kinds = [d["kind"] for d in load_k8s(K8S_CONFIG)]
    assert "Secret" not in kinds, "no Secret object (with values) in the repository"


# ------------------------------------------------------------------------- base job template


def test_base_job_template_is_accepted_by_the_prefect_server_schema() -> None:
    """The server's own WorkPoolCreate validation (every placeholder declared as a variable)."""
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=_template(), concurrency_limit=1)
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    variables = _template()["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)


def test_base_job_template_renders_a_valid_gpu_job() -> None:
    manifest = render_base_job_template(_template())
    # non-strict: exactly as rendered, with the two pod-spec keys the Prefect worker requires
    assert k8s_problems(manifest, strict=False) == []
    strict = k8s_problems(manifest, strict=True)
    assert len(strict) == 1 and all(k in strict[0] for k in PREFECT_POD_SPEC_EXTRAS), strict
    assert k8s_problems(strip_prefect_pod_extras(manifest), strict=True) == []
    [c] = container_specs(manifest)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["args"] == ["prefect", "flow-run", "execute"], "the worker's command"
    assert {"secretRef": {"name": "miroflow-env"}} in c["envFrom"]
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in c["env"])
    assert c["image"] == _template()["variables"]["properties"]["image"]["default"]


def test_job_variables_of_a_deployment_reach_the_job() -> None:
    manifest = render_base_job_template(_template(), {"gpu_count": 4, "env": {"TRAIN_NOTE": "x"}})
    assert k8s_problems(strip_prefect_pod_extras(manifest)) == []
    [c] = container_specs(manifest)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "TRAIN_NOTE", "value": "x"} in c["env"]


def test_a_broken_base_job_template_fails(tmp_path: Path) -> None:
    """A variable default of the wrong type renders into an invalid Job; an undeclared placeholder is
    refused by the server schema."""
    from prefect.server.schemas.actions import WorkPoolCreate

    bad = copy.deepcopy(_template())
    bad["variables"]["properties"]["backoff_limit"]["default"] = "none"
    path = tmp_path / "bad-template.json"
    path.write_text(json.dumps(bad))
    manifest = render_base_job_template(json.loads(path.read_text()))
    [problem] = k8s_problems(strip_prefect_pod_extras(manifest))
    assert "spec/backoffLimit: 'none' is not of type 'integer'" in problem

    undeclared = copy.deepcopy(_template())
    undeclared["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="undeclared variable.*deadline"):
        WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=undeclared)


# ------------------------------------------------------------------------- helm values

#: The keys of the prefect-worker chart's values this file may set (from the chart's values schema;
#: a misspelt key there is silently ignored by Helm, so it is checked here).
HELM_KEYS: dict[str, Any] = {
    "worker": {
        "image": {"repository": str, "prefectTag": str, "pullPolicy": str, "pullSecrets": list, "debug": bool},
        "config": {
            "workPool": str,
            "workQueues": list,
            "type": str,
            "installPolicy": str,
            "name": str,
            "limit": int,
            "jobNamespace": str,
            "baseJobTemplate": dict,
        },
        "apiConfig": str,
        "selfHostedServerApiConfig": {"apiUrl": str, "basicAuth": dict},
        "resources": dict,
        "nodeSelector": dict,
        "tolerations": list,
        "extraEnvVars": list,
        "replicaCount": int,
    },
    "serviceAccount": dict,
    "role": dict,
    "rolebinding": dict,
}


def helm_key_problems(values: Any, known: Any, where: str = "") -> list[str]:
    """Keys of ``values`` that the chart does not have, or of the wrong type."""
    if isinstance(known, type):
        return [] if isinstance(values, known) else [f"{where}: expected {known.__name__}, got {values!r}"]
    if not isinstance(values, dict):
        return [f"{where}: expected a mapping"]
    out: list[str] = []
    for key, value in values.items():
        if key not in known:
            out.append(f"{where}.{key}: not a value of the prefect-worker chart".lstrip("."))
        else:
            out += helm_key_problems(value, known[key], f"{where}.{key}".lstrip("."))
    return out


def test_helm_values_serve_the_gpu_pool_with_a_kubernetes_worker() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert helm_key_problems(values, HELM_KEYS) == []
    cfg = values["worker"]["config"]
    assert (cfg["workPool"], cfg["type"]) == ("gpu", "kubernetes")
    assert values["worker"]["apiConfig"] == "selfHostedServer"
    assert values["worker"]["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    assert values["worker"]["image"]["prefectTag"].endswith("-kubernetes"), "the image with prefect-kubernetes"
    template_ns = _template()["variables"]["properties"]["namespace"]["default"]
    assert cfg["jobNamespace"] == template_ns, "the worker watches the namespace its Jobs are created in"


def test_helm_key_check_catches_a_typo() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    values["worker"]["config"]["workpool"] = values["worker"]["config"].pop("workPool")
    values["worker"]["image"]["prefectTag"] = 3
    assert helm_key_problems(values, HELM_KEYS) == [
        "worker.image.prefectTag: expected str, got 3",
        "worker.config.workpool: not a value of the prefect-worker chart",
    ]
