"""Offline checks of the deployable infra (infra/, prefect.yaml), shared by the tests in tests/infra/.

There is no Docker engine on the development and CI machines, so nothing here builds an image or
starts a container. Instead each file is checked with the tool that defines its format:

- Kubernetes manifests: kubernetes-validate's bundled (offline) OpenAPI-derived JSON schemas.
- The Prefect Kubernetes base job template: rendered by prefect-kubernetes' own
  ``KubernetesWorkerJobConfiguration`` (what the worker does for a flow run), then validated as a Job.
- docker-compose.yml: interpolated like ``docker compose`` does, then validated against the
  compose-spec JSON schema that check-jsonschema vendors (``docker compose config`` needs the
  compose plugin, which this machine's docker client lacks).
- Image references, env var names and secret-looking values: small parsers below.

Every check returns a list of problems (empty = fine), so the tests can run the same function on a
deliberately broken copy and assert on its message.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib.resources
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
ENV_EXAMPLE = INFRA / "env.example"
K8S = INFRA / "k8s"
BASE_JOB_TEMPLATE = K8S / "gpu-base-job-template.json"
TRAIN_JOB = K8S / "train-job.yaml"
K8S_CONFIG = K8S / "miroflow-config.yaml"
HELM_VALUES = K8S / "worker-values.yaml"
PREFECT_YAML = REPO / "prefect.yaml"

#: The Kubernetes release whose schemas the manifests are checked against (kubernetes-validate
#: ships 1.25 ... 1.37; 1.33 is a release every major managed Kubernetes still supports).
K8S_VERSION = "1.33"

#: Keys the Prefect Kubernetes worker insists on in the *pod* spec of a base job template
#: (``_get_base_job_manifest``) although they belong to the Job spec; the API server drops them.
PREFECT_POD_SPEC_EXTRAS = ("parallelism", "completions")

#: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``${VAR?err}`` or ``$VAR``;
#: ``$$`` is a literal dollar (compose's escape).
_COMPOSE_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")
#: Kubernetes' ``$(VAR)`` in a container's command/args (``$$(VAR)`` is the escape).
_K8S_VAR = re.compile(r"(?<!\$)\$\((\w+)\)")
#: Prefect's ``{{ $VAR }}`` in prefect.yaml (filled from the environment by ``prefect deploy``).
_PREFECT_ENV_VAR = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")
#: ``NAME=value`` or, for an optional variable, ``# NAME=value`` in env.example.
_ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
#: A name that holds a secret.
SECRET_NAME = re.compile(
    r"PASSW(?:OR)?D|(?:^|_)(?:SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(?:_|$)", re.I
)
#: scheme://user:password@host
_URI_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^/\s@]+)@")
#: A value that is only a reference: ``${VAR}``, ``$${VAR}``, ``$(VAR)``, ``{{ ... }}`` (possibly several).
_PLACEHOLDER_ONLY = re.compile(r"^(?:\$?\$\{\w+[^}]*\}|\$\(\w+\)|\{\{[^}]*\}\})+$")
#: A tag that floats: only a major version (``16``, ``v3``, ``3-python3.11``) or a "latest" word.
_FLOATING_TAG = re.compile(r"^v?\d+(-[A-Za-z][\w.-]*)?$")


# ------------------------------------------------------------------------------------ env files


def env_example_names(text: str | None = None) -> dict[str, bool]:
    """Variables documented in env.example: ``{name: required}`` (``# NAME=`` lines are optional)."""
    text = ENV_EXAMPLE.read_text() if text is None else text
    out: dict[str, bool] = {}
    for line in text.splitlines():
        m = _ENV_LINE.match(line.strip())
        if m:
            out[m[2]] = out.get(m[2], False) or m[1] is None
    return out


def env_example_values(text: str | None = None) -> dict[str, str]:
    """``NAME=value`` assignments of env.example (the non-comment lines), as compose reads them."""
    text = ENV_EXAMPLE.read_text() if text is None else text
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _ENV_LINE.match(line.strip())
        if m and m[1] is None:
            out[m[2]] = m[3]
    return out


# ------------------------------------------------------------------------------------ compose


def compose_variables(text: str) -> set[str]:
    """Every variable a compose file interpolates (``$$`` escapes and comments excluded)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in _COMPOSE_VAR.finditer(line):
            if m[0] != "$$":
                names.add(m[1] or m[4])
    return names


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-style interpolation of every string in ``value`` (keys are left alone).

    Raises:
        KeyError: a variable without a default is not in ``env`` (the message names it).
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, op, arg = m[1] or m[4], m[2], m[3]
        got = env.get(name)
        if op in (":-", "-"):
            return arg if (got is None or (op == ":-" and got == "")) else got
        if got is None or (op == ":?" and got == ""):
            raise KeyError(f"${{{name}}} is not set{f': {arg}' if arg else ''}")
        return got

    return _COMPOSE_VAR.sub(one, value)


def load_compose(text: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as ``docker compose config`` would see it: YAML + interpolation from ``env``."""
    doc = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    if not isinstance(doc, dict):
        raise ValueError("a compose file is a mapping")
    return interpolate(doc, env_example_values() if env is None else env)


@cache
def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema (draft 2020-12) vendored by check-jsonschema, read offline."""
    res = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(res.read_text(encoding="utf-8"))


def _where(path: Iterable[Any]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def compose_schema_problems(doc: dict[str, Any]) -> list[str]:
    """Violations of the compose spec, one ``path: message`` line each (sorted by path)."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors]


def services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``services`` of a compose document, each as a dict."""
    return {name: (svc or {}) for name, svc in (doc.get("services") or {}).items()}


def port_problems(doc: dict[str, Any]) -> list[str]:
    """Published ports that are not bound to 127.0.0.1 (short or long syntax), and host networking."""
    out: list[str] = []
    for name, svc in services(doc).items():
        if svc.get("network_mode") == "host":
            out.append(f"{name}: network_mode host binds every interface of the host")
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                ok = port.get("host_ip") == "127.0.0.1"
            else:
                parts = str(port).split(":")
                ok = len(parts) == 3 and parts[0] == "127.0.0.1"
            if not ok:
                out.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
    return out


def command_words(value: Any) -> list[str]:
    """A compose ``command``/``entrypoint`` (string or list) as a flat list of words."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [w for item in value for w in str(item).split()]


# ------------------------------------------------------------------------------------ images


def image_pin_problem(ref: str) -> str | None:
    """Why an image reference is not pinned (no tag, ``latest``, a floating tag, a variable), or None."""
    if "$" in ref or "{{" in ref:
        return f"{ref}: a variable, not a pinned image"
    if re.search(r"@sha256:[0-9a-f]{64}$", ref):
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{ref}: no tag (means latest)"
    tag = last.split(":", 1)[1]
    if not tag or "latest" in tag.split("-"):
        return f"{ref}: latest"
    if _FLOATING_TAG.match(tag):
        return f"{ref}: floating tag {tag!r} (only a major version)"
    return None


def dockerfile_stages(text: str | None = None) -> list[tuple[str, str | None]]:
    """``(image, stage name)`` of every FROM line of a Dockerfile (``--platform=`` skipped)."""
    text = DOCKERFILE.read_text() if text is None else text
    out: list[tuple[str, str | None]] = []
    for m in re.finditer(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", text, flags=re.M | re.I):
        out.append((m[1], m[2]))
    return out


def dockerfile_base_images(text: str | None = None) -> list[str]:
    """FROM images that are real images (a FROM naming an earlier stage is not an image pull)."""
    seen: set[str] = set()
    out: list[str] = []
    for image, alias in dockerfile_stages(text):
        if image not in seen:
            out.append(image)
        if alias:
            seen.add(alias)
    return out


def walk(value: Any) -> Iterator[dict[str, Any]]:
    """Every mapping nested anywhere in ``value`` (depth first)."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def container_specs(doc: Any) -> list[dict[str, Any]]:
    """Every container/initContainer spec in a manifest (Jobs, templates, any nesting)."""
    out: list[dict[str, Any]] = []
    for node in walk(doc):
        for key in ("containers", "initContainers", "ephemeralContainers"):
            if isinstance(node.get(key), list):
                out += [c for c in node[key] if isinstance(c, dict)]
    return out


def helm_worker_image(values: dict[str, Any]) -> str:
    """The image the prefect-worker chart runs for these values (``repository:prefectTag``)."""
    image = values["worker"]["image"]
    return f"{image['repository']}:{image['prefectTag']}"


def all_image_refs() -> dict[str, list[str]]:
    """Every image reference of the infra, by the file that names it."""
    compose = load_compose()
    k8s_docs = [d for p in (TRAIN_JOB, K8S_CONFIG) for d in load_k8s(p)]
    template = json.loads(BASE_JOB_TEMPLATE.read_text())
    return {
        "infra/docker-compose.yml": [str(s["image"]) for s in services(compose).values() if "image" in s],
        "infra/Dockerfile": dockerfile_base_images(),
        "infra/mlflow/Dockerfile": dockerfile_base_images((INFRA / "mlflow" / "Dockerfile").read_text()),
        "infra/k8s/*.yaml": [str(c.get("image")) for d in k8s_docs for c in container_specs(d)],
        # the Job's container image is the template variable {{ image }}: its default is what runs
        "infra/k8s/gpu-base-job-template.json": [
            str(template["variables"]["properties"]["image"]["default"])
            if c.get("image") == "{{ image }}"
            else str(c.get("image"))
            for c in container_specs(template["job_configuration"]["job_manifest"])
        ],
        "infra/k8s/worker-values.yaml": [helm_worker_image(yaml.safe_load(HELM_VALUES.read_text()))],
    }


# ------------------------------------------------------------------------------------ kubernetes


def load_k8s(path: Path) -> list[dict[str, Any]]:
    """The documents of a (multi-document) YAML manifest file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_problems(doc: dict[str, Any], strict: bool = True, version: str = K8S_VERSION) -> list[str]:
    """kubernetes-validate's verdict on one resource (``strict``: unknown fields are errors too)."""
    try:
        kubernetes_validate.validate(doc, version, strict=strict)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}: {_where(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def render_base_job_template(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job manifest the Prefect Kubernetes worker would submit for one flow run.

    Uses prefect-kubernetes' ``KubernetesWorkerJobConfiguration``: variable defaults and ``values``
    (a deployment's job_variables) are applied to the template, then ``prepare_for_flow_run`` adds
    the env, labels, generated name and ``prefect flow-run execute`` command, as the worker does.
    Needs a Prefect API URL in the settings context (else Prefect starts a temporary server).
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(copy.deepcopy(template), values or {}))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="infra-check", flow_id=uuid.uuid4()))
    return cfg.job_manifest


def strip_prefect_pod_extras(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of a rendered job manifest without :data:`PREFECT_POD_SPEC_EXTRAS` in its pod spec."""
    out = copy.deepcopy(manifest)
    pod = out["spec"]["template"]["spec"]
    for key in PREFECT_POD_SPEC_EXTRAS:
        pod.pop(key, None)
    return out


def k8s_variables(doc: Any) -> set[str]:
    """``$(VAR)`` references in the command/args of every container of a manifest."""
    names: set[str] = set()
    for c in container_specs(doc):
        for word in [*(c.get("command") or []), *(c.get("args") or [])]:
            names |= set(_K8S_VAR.findall(str(word)))
    return names


def k8s_env_names(doc: Any) -> set[str]:
    """Names a manifest puts into a container environment: ``env`` entries and ConfigMap/Secret keys."""
    names: set[str] = set()
    for c in container_specs(doc):
        env = c.get("env")
        if isinstance(env, list):
            names |= {e["name"] for e in env if isinstance(e, dict) and "name" in e}
    for node in walk(doc):
        if node.get("kind") in ("ConfigMap", "Secret"):
            names |= set((node.get("data") or {}) | (node.get("stringData") or {}))
    return names


def prefect_env_variables(text: str) -> set[str]:
    """``{{ $VAR }}`` placeholders of a prefect.yaml."""
    return set(_PREFECT_ENV_VAR.findall(text))


# ------------------------------------------------------------------------------------ the code


def code_env_reads(roots: Iterable[Path] = (REPO / "src" / "miroflow", REPO / "flows")) -> set[str]:
    """Environment variable names the code reads: ``os.environ.get/[]``, ``os.getenv``, typer's
    ``envvar=``, and module constants named ``*_ENV`` whose value is a variable name."""
    names: set[str] = set()

    def const(node: ast.AST | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    consts: dict[str, str] = {}
    trees = [ast.parse(p.read_text(), filename=str(p)) for root in roots for p in sorted(root.rglob("*.py"))]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value = const(node.value)
                if value and node.targets[0].id.endswith("_ENV") and re.fullmatch(r"[A-Z][A-Z0-9_]+", value):
                    consts[node.targets[0].id] = value
    for tree in trees:
        for node in ast.walk(tree):
            arg: ast.AST | None = None
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "environ.get", "os.getenv", "getenv", "os.environ.pop") and node.args:
                    arg = node.args[0]
                for kw in node.keywords:
                    if kw.arg == "envvar":
                        names.add(const(kw.value) or "")
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                arg = node.slice
            if arg is not None:
                name = const(arg) or (consts.get(arg.id) if isinstance(arg, ast.Name) else None)
                if name:
                    names.add(name)
    names.discard("")
    return names


# ------------------------------------------------------------------------------------ secrets


def secret_value_problems(text: str, where: str) -> list[str]:
    """Secret-named keys with a literal value, and URIs carrying a literal password, in a config text.

    Values that only reference a variable (``${X}``, ``$${X}``, ``$(X)``, ``{{ x }}``) are fine;
    so is a secret-named key whose value names a Secret object (``secretRef``-style ``name:``).
    """
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = re.match(r"^[-\s]*\"?([A-Za-z_][\w.-]*)\"?\s*[:=]\s*(.*?)\s*,?$", stripped)
        if m and SECRET_NAME.search(m[1]):
            value = m[2].strip().strip("'\"")
            if (
                value
                and value not in ("{", "[", "{}", "[]", "null", "|", ">", ">-")
                and not _PLACEHOLDER_ONLY.match(value)
            ):
                out.append(f"{where}:{n}: {m[1]} has a literal value")
        for cred in _URI_CREDENTIALS.findall(stripped):
            if not _PLACEHOLDER_ONLY.match(cred):
                out.append(f"{where}:{n}: a URI with a literal password")
    return out
