"""Prefect flow for the score and bin stages (a thin layer over :mod:`miroflow.score`).

``score_dataset`` resolves the params, then runs the subflow ``score-shards`` with the task runner that
``params.score`` asks for, chosen at run time (so a deployment's form or overrides pick it):
``ThreadPoolTaskRunner(max_workers=score.max_workers)`` when ``score.executor`` is ``thread``; with
``dask``, prefect-dask's ``DaskTaskRunner`` on a ``LocalCluster`` of ``score.max_workers``
single-threaded worker processes, or on the running scheduler at ``score.dask_address``. The subflow maps
one ``score_shard`` task per shard (URIs and small dicts in, small dicts out; never tensors). The score
manifest and the bins are written by tasks called directly in ``score_dataset``, so they run in the
flow's own process and the local manifests (``score.manifest``, ``score.bins``) land on the machine
that runs the flow even when shards are scored on Dask workers.

The local cluster's scheduler, dashboard (port 8787, or a free port when that is taken) and workers
bind 127.0.0.1 only; to expose them on another interface, pass ``dask_host=`` to
:func:`make_task_runner` or set ``MIROFLOW_DASK_HOST`` (e.g. ``0.0.0.0``; put authentication in front:
the dashboard has none). A ``score.dask_address`` that does not answer fails the run before any task,
naming the field.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flows._records import FLOW_RESULTS, abs_uri, publish
from miroflow import stages
from miroflow.config import Params, ScoreConfig, StorageConfig, resolve_params
from miroflow.data.shards import read_manifest
from miroflow.results import ShardScore
from miroflow.score import score_table_uri
from miroflow.storage import InvalidURIError, NoSuchBucketError, NotFoundError, StorageError

__all__ = [
    "score_dataset",
    "score_shards",
    "check_dask_address",
    "describe_executor",
    "score_shard_task",
    "write_manifest_task",
    "bin_task",
    "is_transient",
    "make_task_runner",
    "dask_cluster_kwargs",
    "run",
]

#: Interface the local Dask cluster (scheduler, dashboard, workers) binds unless told otherwise.
DEFAULT_DASK_HOST = "127.0.0.1"
#: Environment variable that opts in to another bind address for the local Dask cluster.
DASK_HOST_ENV = "MIROFLOW_DASK_HOST"
#: Preferred port of the Dask dashboard (distributed picks a free one when it is taken).
DASK_DASHBOARD_PORT = 8787

#: Seconds to wait for ``score.dask_address`` to accept a TCP connection before the run fails.
DASK_CONNECT_TIMEOUT_S = 5.0

#: Delays (s) between the retries of a shard task after a transient storage error.
RETRY_DELAYS_S: list[float] = [2, 10, 30]


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a storage error worth retrying (not a missing object/bucket or a bad URI)."""
    if isinstance(exc, (NotFoundError, NoSuchBucketError, InvalidURIError)):
        return False
    return isinstance(exc, (StorageError, ConnectionError, TimeoutError))


def _retry_on_transient(task_: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient storage errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            res = state.result(raise_on_failure=False)
        except Exception:  # result not retrievable: be conservative
            return False
        exc = res if isinstance(res, BaseException) else None
    return is_transient(exc)


@task(
    name="score_shard",
    retries=len(RETRY_DELAYS_S),
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=_retry_on_transient,
    task_run_name="score_shard-{shard_uri}",
)
def score_shard_task(
    shard_uri: str, out_uri: str, expected_sha256: str | None, score: dict[str, Any], storage: dict[str, Any]
) -> dict[str, Any]:
    """Score one shard into its table (skipped when already up to date): :func:`miroflow.stages.score_one_shard`.

    Args:
        shard_uri / out_uri: shard tar and score-table URIs.
        expected_sha256: the shard's sha256 from the shard manifest.
        score / storage: ``params.score`` / ``params.storage`` as JSON dicts.
    """
    r = stages.score_one_shard(
        shard_uri, out_uri, expected_sha256, ScoreConfig.model_validate(score), StorageConfig.model_validate(storage)
    )
    get_run_logger().info(
        "shard %s: %s (%d rows, %d failures) -> %s",
        shard_uri,
        "up to date" if r.skipped else "scored",
        r.n,
        r.failures,
        r.uri,
    )
    return r.to_dict()


@task(name="write_score_manifest")
def write_manifest_task(params: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the local score manifest from the shard results; returns a small summary."""
    r = stages.write_scores(Params.model_validate(params), [ShardScore.from_dict(x) for x in results])
    return {"path": abs_uri(str(r.manifest)), "tables": r.num_tables, "num_rows": r.num_rows}


@task(name="bin")
def bin_task(params: dict[str, Any]) -> dict[str, Any]:
    """Fit the bins from the score manifest; returns ``{"path", "hash", "rewards": {name: n}}``."""
    r = stages.bin_scores(Params.model_validate(params))
    return {"path": abs_uri(r.path), "hash": r.hash, "rewards": r.counts}


@flow(name="score-shards", log_prints=True)
def score_shards(shards: list[dict[str, Any]], score: dict[str, Any], storage: dict[str, Any]) -> list[dict[str, Any]]:
    """Score every shard on this flow run's task runner (set by :func:`score_dataset`).

    Args:
        shards: one ``{"uri", "out_uri", "sha256"}`` per shard: shard tar, its score table, its sha256.
        score / storage: ``params.score`` / ``params.storage`` as JSON dicts.

    Returns:
        One :class:`~miroflow.results.ShardScore` dict per shard, in the order of ``shards``.
    """
    futures = score_shard_task.map(
        shard_uri=[s["uri"] for s in shards],
        out_uri=[s["out_uri"] for s in shards],
        expected_sha256=[s["sha256"] for s in shards],
        score=unmapped(score),
        storage=unmapped(storage),
    )
    return [f.result() for f in futures]


@flow(name="score-dataset", log_prints=True, **FLOW_RESULTS)
def score_dataset(
    params_file: str | None = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Score every shard of the dataset, write the score manifest, then fit the bins.

    The shards are scored by the subflow ``score-shards`` on ``score.executor``'s task runner: threads
    (``score.max_workers``), or Dask (a local cluster of ``score.max_workers`` processes on 127.0.0.1, or
    the scheduler at ``score.dask_address``).

    Args:
        params_file: params.yaml to load first (empty: the code defaults).
        overrides: DVC-style ``section.key=value`` overrides, applied last.
        params: typed config form; only the fields you set are merged onto ``params_file``'s values.

    Returns:
        ``{"shards": n, "scored": n, "skipped": n, "failures": n, "executor": ..., "manifest": {...}, "bins": {...}}``.
    """
    p = resolve_params(params_file, overrides, params)
    stages.preflight(p, "score")  # every problem named before any shard task starts
    runner = make_task_runner(p.score)
    where = describe_executor(p.score)
    get_run_logger().info("scoring shards on %s", where)
    shards = [
        {"uri": sh["uri"], "out_uri": score_table_uri(p, sh["uri"]), "sha256": sh["sha256"]}
        for sh in read_manifest(p.data.manifest)["shards"]
    ]
    results = score_shards.with_options(task_runner=runner)(
        shards, p.score.model_dump(mode="json"), p.storage.model_dump(mode="json")
    )
    manifest = write_manifest_task(p.model_dump(mode="json"), results)  # direct calls: run in the flow's process
    bins = bin_task(p.model_dump(mode="json"))
    out = {
        "shards": len(results),
        "scored": sum(1 for r in results if not r["skipped"]),
        "skipped": sum(1 for r in results if r["skipped"]),
        "failures": sum(int(r["failures"]) for r in results),
        "executor": where,
        "manifest": manifest,
        "bins": bins,
    }
    facts = {k: out[k] for k in ("shards", "scored", "skipped", "failures", "executor")}
    facts |= {"rows": manifest["num_rows"], "score manifest": f"`{manifest['path']}`", "bins": f"`{bins['path']}`"}
    rows = [{"reward": k, "values fitted": n, "bins": p.score.num_bins} for k, n in bins["rewards"].items()]
    publish("score-dataset", p, facts, rows, title=f"score-dataset {p.data.manifest}")
    return out


def describe_executor(cfg: ScoreConfig) -> str:
    """One line naming where shards are scored, e.g. ``dask scheduler tcp://10.0.0.5:8786``."""
    if cfg.executor == "thread":
        return f"{cfg.max_workers} threads"
    if cfg.dask_address:
        return f"dask scheduler {cfg.dask_address}"
    return f"dask LocalCluster of {cfg.max_workers} worker processes"


def check_dask_address(address: str, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """Fail fast unless the Dask scheduler at ``address`` (``[proto://]host:port``) accepts a TCP connection.

    Raises:
        ValueError: naming ``score.dask_address``, the address and the connection error.
    """
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ValueError(
            f"score.dask_address: no Dask scheduler answers at {address!r} within {timeout_s:g} s "
            f"({type(err).__name__}: {err}); start one (dask scheduler) or leave score.dask_address empty "
            "for a local cluster"
        ) from None


def dask_cluster_kwargs(cfg: ScoreConfig, dask_host: str | None = None) -> dict[str, Any]:
    """``distributed.LocalCluster`` kwargs for the shard tasks, bound to loopback unless told otherwise.

    Args:
        cfg: ``params.score`` (``max_workers`` single-threaded worker processes).
        dask_host: interface for the scheduler, dashboard and workers; default ``$MIROFLOW_DASK_HOST``,
            else 127.0.0.1. (distributed's own default dashboard address, ``:8787``, is every interface.)
    """
    host = (dask_host or os.environ.get(DASK_HOST_ENV, "").strip() or DEFAULT_DASK_HOST).strip()
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host  # IPv6 literal
    return {
        "n_workers": cfg.max_workers,
        "threads_per_worker": 1,
        "host": host,
        "dashboard_address": f"{bracketed}:{DASK_DASHBOARD_PORT}",
    }


def make_task_runner(cfg: ScoreConfig, dask_host: str | None = None) -> Any:
    """The task runner for shard tasks: threads, or (``executor: dask``) a local Dask cluster or the
    scheduler at ``score.dask_address`` (checked to answer first).

    Args:
        cfg: ``params.score``.
        dask_host: opt-in bind address of the local Dask cluster (see :func:`dask_cluster_kwargs`).

    Raises:
        ValueError: ``score.dask_address`` does not answer (names the field).
    """
    if cfg.executor == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise ImportError(
                "score.executor is 'dask' but prefect-dask is not installed (pip install '.[dask]')"
            ) from err
        if cfg.dask_address:
            check_dask_address(cfg.dask_address)
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs=dask_cluster_kwargs(cfg, dask_host))
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def run(params: Params) -> dict[str, Any]:
    """Run :func:`score_dataset` on ``params`` (which picks the task runner from ``params.score`` itself)."""
    return score_dataset(params_file=None, params=params)
