"""The logger of a task body, inside Prefect or not."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger in a flow or task run; the module's logger otherwise
    (task bodies also run without Prefect: ``tasks.stages.SequentialRun``, tests)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
