"""The score flow's local Dask cluster listens on loopback only (scheduler, dashboard, workers).

distributed's own default dashboard address is ``:8787``, i.e. every interface, and its HTTP server
(``/health``, ``/metrics``, and the Bokeh dashboard when bokeh is installed) starts even without
bokeh; ``dashboard_link`` still prints 127.0.0.1 then, so the test reads the sockets themselves.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest

from miroflow.config import ScoreConfig

psutil = pytest.importorskip("psutil")
pytest.importorskip("prefect_dask")


def _listening() -> set[tuple[int, str, int]]:
    """``(pid, ip, port)`` of every listening inet socket of this process and its children."""
    me = psutil.Process()
    out: set[tuple[int, str, int]] = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def test_local_dask_cluster_binds_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.score_dataset import DASK_HOST_ENV, make_task_runner

    monkeypatch.delenv(DASK_HOST_ENV, raising=False)
    runner = make_task_runner(ScoreConfig(executor="dask", max_workers=1))
    before = _listening()
    with runner:
        client = runner.client  # creates the LocalCluster exactly as the flow run does
        cluster = runner._cluster
        assert cluster is not None
        new = _listening() - before
        scheduler = urlsplit(cluster.scheduler_address)
        dashboard = urlsplit(cluster.dashboard_link)
        assert client.scheduler_info()["workers"], "the worker process did not join"

    assert scheduler.hostname == "127.0.0.1", cluster.scheduler_address
    assert dashboard.hostname == "127.0.0.1", cluster.dashboard_link
    ports = {port for _, _, port in new}
    assert scheduler.port in ports and dashboard.port in ports, (new, scheduler, dashboard)
    exposed = sorted(s for s in new if not ipaddress.ip_address(s[1]).is_loopback)
    assert not exposed, f"Dask cluster listens beyond loopback: {exposed}"
    assert {ip for _, ip, _ in new} == {"127.0.0.1"}, new


def test_dask_bind_address_is_an_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.score_dataset import DASK_HOST_ENV, dask_cluster_kwargs, make_task_runner

    cfg = ScoreConfig(executor="dask", max_workers=3)
    monkeypatch.delenv(DASK_HOST_ENV, raising=False)
    kw = dask_cluster_kwargs(cfg)
    assert kw == {"n_workers": 3, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": "127.0.0.1:8787"}
    assert make_task_runner(cfg).cluster_kwargs == kw

    monkeypatch.setenv(DASK_HOST_ENV, "0.0.0.0")
    assert dask_cluster_kwargs(cfg)["host"] == "0.0.0.0"
    assert dask_cluster_kwargs(cfg)["dashboard_address"] == "0.0.0.0:8787"
    assert dask_cluster_kwargs(cfg, dask_host="::1")["dashboard_address"] == "[::1]:8787"  # argument wins
    monkeypatch.setenv(DASK_HOST_ENV, "")
    assert dask_cluster_kwargs(cfg)["host"] == "127.0.0.1"
