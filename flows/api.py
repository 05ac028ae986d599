"""The Prefect API a run talks to: the operator's server when one is configured,
otherwise one embedded server shared by this process and its Dask workers.

Without this, each Dask worker process would start its own ephemeral API server
(seconds each, and runs split over several databases).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL in use; start (and later stop) an embedded server if none."""
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    previous = os.environ.get("PREFECT_API_URL")
    # Worker processes inherit the environment; this process needs the setting.
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        # Logs still queued for the API must go before the server does, or the
        # process waits on connection retries at exit.
        APILogHandler().flush()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop()
