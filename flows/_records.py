"""What links a Prefect flow run to the rest of the records (docs/control-room.md).

- :func:`prefect_run_tags`: registered (on import) as a tag provider of :mod:`miroflow.tracking`, so every
  MLflow run opened while a flow runs carries ``prefect.flow_run_id``, ``prefect.flow_run_url`` (when a
  server is configured) and ``prefect.flow_name``.
- :func:`publish`: the flow run's markdown summary (rounded numbers, MLflow run ids, absolute URIs) and
  table artifact (one row per run with its reward means).
- :func:`check_params` (warnings, e.g. ``train.warmup_steps >= train.steps``) and
  :func:`require_confirmation` (the full-size guard of the pipeline flow).
- :func:`forward_metrics`: the library's ``miroflow.tracking.metrics`` log lines (the training loss every
  ``train.log_every`` steps) forwarded to the Prefect run logger of the calling task.
- :data:`FLOW_RESULTS`: the result options of every flow (persisted, JSON, local filesystem).

miroflow itself never imports Prefect; this module is the bridge.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import get_current_settings

from miroflow.config import Params
from miroflow.tracking import absolute_uri, register_tag_provider, resolve_tracking_uri
from miroflow.tracking.context import metrics_handler
from miroflow.tracking.uris import safe_uri

__all__ = [
    "FLOW_RESULTS",
    "FULL_SIZE_STEPS",
    "FULL_SIZE_SAMPLES",
    "prefect_run_tags",
    "flow_run_url",
    "check_params",
    "require_confirmation",
    "forward_metrics",
    "publish",
    "mlflow_ref",
    "abs_uri",
    "rounded",
    "hacking_fact",
    "sweep_flags",
]

#: Flow options: results persisted as JSON (never pickle) under ``PREFECT_LOCAL_STORAGE_PATH``
#: (default ``~/.prefect/storage``; a local directory, so it works offline), unless
#: ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` names another storage block.
FLOW_RESULTS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}

#: Above these, a pipeline run is "full size" and needs ``confirm_full_size=True``.
FULL_SIZE_STEPS = 200
FULL_SIZE_SAMPLES = 1000

_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page: ``$PREFECT_UI_URL/runs/flow-run/<id>``, else derived from ``PREFECT_API_URL``
    (``http://host:4200/api`` -> ``http://host:4200/runs/flow-run/<id>``); ``None`` without a server URL."""
    settings = get_current_settings()
    base = settings.ui_url or ""
    if not base and settings.api.url:
        base = re.sub(r"/api/?$", "", str(settings.api.url))
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def prefect_run_tags() -> dict[str, str]:
    """MLflow tags of the Prefect flow run this thread runs in (``{}`` outside any flow run)."""
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx = FlowRunContext.get()
    task_ctx = TaskRunContext.get()
    run_id = None
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        run_id = str(flow_ctx.flow_run.id)
    elif task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        run_id = str(task_ctx.task_run.flow_run_id)
    if run_id is None:
        return {}
    tags = {"prefect.flow_run_id": run_id}
    if flow_ctx is not None and flow_ctx.flow is not None:
        tags["prefect.flow_name"] = flow_ctx.flow.name
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        tags["prefect.flow_run_name"] = flow_ctx.flow_run.name
    url = flow_run_url(run_id)
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


register_tag_provider(prefect_run_tags)


def check_params(p: Params) -> list[str]:
    """Warn (run logger) about params that are valid but probably not meant; returns the warnings."""
    warnings = []
    if p.train.warmup_steps >= p.train.steps:
        warnings.append(
            f"train.warmup_steps ({p.train.warmup_steps}) >= train.steps ({p.train.steps}): "
            "the learning rate never leaves warmup"
        )
    log = get_run_logger()
    for w in warnings:
        log.warning(w)
    return warnings


def require_confirmation(p: Params, confirmed: bool, parameter: str = "confirm_full_size") -> None:
    """Fail fast unless ``confirmed`` when ``p`` trains more than :data:`FULL_SIZE_STEPS` steps or renders
    more than :data:`FULL_SIZE_SAMPLES` samples.

    Raises:
        ValueError: naming ``parameter`` and the sizes that need it.
    """
    big = []
    if p.train.steps > FULL_SIZE_STEPS:
        big.append(f"train.steps={p.train.steps} > {FULL_SIZE_STEPS}")
    if p.data.num_samples > FULL_SIZE_SAMPLES:
        big.append(f"data.num_samples={p.data.num_samples} > {FULL_SIZE_SAMPLES}")
    if big and not confirmed:
        raise ValueError(
            f"full-size run ({', '.join(big)}): set the flow parameter {parameter}=true to start it, "
            "or make it smaller (e.g. overrides train.steps=..., data.num_samples=...)"
        )


@contextmanager
def forward_metrics() -> Iterator[None]:
    """Forward this thread's ``miroflow.tracking.metrics`` lines to the current Prefect run logger (INFO)."""
    run_log = get_run_logger()
    thread = threading.get_ident()

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread:
                run_log.info("%s", record.getMessage())

    with metrics_handler(_Forward(logging.INFO)):
        yield


def abs_uri(uri: str | None) -> str | None:
    """``uri`` with a relative local path made absolute against the working directory."""
    return absolute_uri(str(uri)) if uri else uri


def rounded(x: Any, digits: int = 4) -> Any:
    """``x`` rounded to ``digits`` decimals (floats, and floats inside dicts); anything else unchanged."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return x


def mlflow_ref(p: Params, run_id: str | None) -> str:
    """``run <id> at <tracking URI>`` (password-free), or ``-`` when nothing was tracked."""
    if not run_id:
        return "-"
    uri = safe_uri(resolve_tracking_uri(p.tracking))
    if uri.startswith(("http://", "https://")):
        return f"[`{run_id}`]({uri.rstrip('/')}/#/runs/{run_id}) at `{uri}`"
    return f"`{run_id}` at `{uri}`"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def publish(
    kind: str,
    p: Params,
    facts: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    title: str | None = None,
) -> dict[str, str]:
    """Create the flow run's artifacts: a markdown summary and a table; returns their keys.

    Args:
        kind: the flow (``pipeline``, ``train``, ...), part of the artifact keys
            (``<kind>-<run name>-summary`` / ``-rewards``: lowercase letters, digits and dashes).
        p: the resolved params (for the MLflow tracking URI and run name).
        facts: ``label -> value`` lines of the summary (values already rounded / absolute).
        rows: the table, one mapping per run (e.g. ``{"run", "judge_accuracy", "reward/sharpness", ...}``).
        title: the summary's heading (default: ``<kind> <train.run_name>``).
    """
    name = _KEY_BAD.sub("-", f"{kind}-{p.train.run_name}".lower()).strip("-")
    lines = [f"# {title or f'{kind} {p.train.run_name}'}", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in facts.items()]
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(rounded(r.get(c, ""))) for c in cols) + " |" for r in rows]
    lines += ["", f"MLflow tracking URI: `{safe_uri(resolve_tracking_uri(p.tracking))}`; cwd `{os.getcwd()}`"]
    keys = {"summary": f"{name}-summary", "table": f"{name}-rewards"}
    create_markdown_artifact(markdown="\n".join(lines), key=keys["summary"], description=f"{kind} summary")
    table = [{k: rounded(v) for k, v in r.items()} for r in rows] or [{"run": p.train.run_name}]
    create_table_artifact(table=table, key=keys["table"], description=f"{kind}: reward means per run")
    return keys


def schema_with_code_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """A flow parameter schema (JSON dict) whose config-section fields all show their code default.

    pydantic leaves ``default`` out of the JSON schema of fields with a ``default_factory`` (lists and
    dicts such as ``train.sample_prompts``), so the Prefect form showed "No items in this list"; this
    fills each missing scalar/list/dict default from the section model (``miroflow.config.<Definition>``)
    validated from ``{}``. Nested sections (``$ref`` properties) are left alone. The config sections now
    emit those defaults themselves (``miroflow.config._factory_defaults_in_schema``, which is what
    ``prefect deploy`` sees), so on their schema this changes nothing; it stays as a guard for
    ``flows/deploy.py``.
    """
    from pydantic import BaseModel

    import miroflow.config as config_module

    out = {**schema, "definitions": {k: dict(v) for k, v in (schema.get("definitions") or {}).items()}}
    for name, definition in out["definitions"].items():
        cls = getattr(config_module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        try:
            defaults = cls.model_validate({}).model_dump(mode="json")
        except Exception:  # noqa: BLE001 - a section without full defaults keeps its schema
            continue
        props = {k: dict(v) for k, v in definition.get("properties", {}).items()}
        for key, prop in props.items():
            if "default" in prop or "$ref" in prop or key not in defaults:
                continue
            if any("$ref" in alt for alt in prop.get("anyOf", [])):
                continue
            prop["default"] = defaults[key]
        definition["properties"] = props
    return out


def hacking_fact(flags: Sequence[str] | None, shown: int = 3) -> str:
    """The summary line of the reward-hacking monitor (docs/hacking.md): ``none`` or the count and the
    first ``shown`` flags, one per line."""
    flags = list(flags or [])
    if not flags:
        return "none"
    more = f"<br>… and {len(flags) - shown} more (MLflow tag `hacking.flags`)" if len(flags) > shown else ""
    return f"**{len(flags)}**: " + "<br>".join(flags[:shown]) + more


def sweep_flags(notes: Sequence[str] | None) -> list[str]:
    """The reward-hacking flags of a sweep, from its ``notes`` (the lines ``hacking: <flag>``)."""
    return [n.removeprefix("hacking: ") for n in notes or [] if n.startswith("hacking: ")]
