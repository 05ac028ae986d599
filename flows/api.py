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
def prefect_api(*, startup_timeout_s: int = 180) -> Iterator[str | None]:
    """Yield the API URL in use; start (and later stop) an embedded server if none.
    The start-up timeout is generous: a loaded 2-core machine needs > 20 s."""
    configured = PREFECT_API_URL.value()
    if configured:
        # Settings given in code (a test harness, a profile) reach Dask worker
        # processes only through the environment they inherit.
        with _exported("PREFECT_API_URL", configured):
            yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=startup_timeout_s)
    try:
        with (
            _exported("PREFECT_API_URL", server.api_url),
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        ):
            try:
                yield server.api_url
            finally:
                # Logs still queued for the API must go before the server does
                # (a failed run too), or the process retries connections at exit.
                APILogHandler().flush()
    finally:
        server.stop()


@contextmanager
def _exported(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
