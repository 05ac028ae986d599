"""Dask worker preload of the quiet command line (flows/console.py): Python
warnings raised in tasks become log records of ``py.warnings``, which Prefect
sends to the API (``PREFECT_LOGGING_EXTRA_LOGGERS``) and the console handler,
at ERROR level, does not print."""

from __future__ import annotations

import logging
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by Dask when the worker starts (``distributed.worker.preload``)."""
    logging.captureWarnings(True)
