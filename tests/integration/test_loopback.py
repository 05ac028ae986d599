"""What a default run opens on the network: the embedded Prefect API, the Dask
scheduler, its dashboard and the workers must all listen on loopback only."""

from __future__ import annotations

import functools
import ipaddress

import prefect.server.api.server
import psutil
import pytest
from distributed import Client, LocalCluster
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.api import prefect_api
from flows.runners import make_task_runner
from flows.serve import free_port

pytestmark = pytest.mark.integration


def listening(process: psutil.Process) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening socket of ``process`` and its children."""
    return [
        (p.pid, conn.laddr.ip, conn.laddr.port)
        for p in [process, *process.children(recursive=True)]
        for conn in p.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]


def test_a_default_run_listens_on_loopback_only(monkeypatch):
    kwargs = {**make_task_runner(workers=1).cluster_kwargs, "n_workers": 1}
    # As a default run starts: no API configured (the session's test server,
    # when another test started it, is set aside), so it embeds its own. Prefect
    # keeps one SubprocessASGIServer per port and the test harness holds the one
    # without a port: the embedded server gets a port of its own, or stopping it
    # would stop the session's server under the tests that follow.
    monkeypatch.setattr(
        prefect.server.api.server,
        "SubprocessASGIServer",
        functools.partial(prefect.server.api.server.SubprocessASGIServer, port=free_port()),
    )
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        prefect_api() as api_url,
        LocalCluster(**kwargs) as cluster,
        Client(cluster),
    ):
        sockets = listening(psutil.Process())
        dashboard = cluster.dashboard_link
    assert api_url.startswith("http://127.0.0.1:")
    assert dashboard.startswith("http://127.0.0.1:")
    # API server, scheduler, dashboard, nanny and worker at least.
    assert len({pid for pid, _, _ in sockets}) >= 3
    assert len(sockets) >= 5
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert exposed == []
