"""What the command line shows: progress bars and the summary, not Prefect's
per-task lines nor third-party warnings (``--verbose`` brings them back).

Quiet is the console only: every log record and warning still reaches the
Prefect API (the run's logs in the UI). Prefect configures logging in each
process from ``PREFECT_LOGGING_*`` variables, so setting them here reaches the
Dask worker processes started later too; handlers already set up in this
process are adjusted in place.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.progress import Progress

CONSOLE_LEVEL = "ERROR"

QUIET_ENV = {
    # Prefect's console handler: errors only (the API handler keeps everything).
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": CONSOLE_LEVEL,
    # Python warnings become log records of "py.warnings", sent to the API.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "py.warnings",
    # Warnings raised outside a run (imports, cluster start-up) have no run to
    # go to; without this Prefect warns about each of them on the console.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "DASK_LOGGING__DISTRIBUTED": "error",
    # torch prints its own log records (e.g. the ONNX exporter's "torchvision is
    # not installed") to stderr from its own handlers, past Prefect's: errors only.
    # These records do not reach the API; --verbose shows them.
    "TORCH_LOGS": "-all",
}
WORKER_PRELOAD = "tasks.worker_logging"
"""Dask worker processes capture their warnings into logging at start-up."""


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, ("prefect", "uvicorn", "fastapi"))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


@contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """Inside the block: the console quiet as described above, unless ``verbose``.
    The operator's own ``PREFECT_LOGGING_*`` settings win."""
    if verbose:
        yield
        return
    import dask

    set_env = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(set_env)
    handlers = [(h, h.level) for h in _console_handlers()] if "prefect" in sys.modules else []
    dask_logger = logging.getLogger("distributed")
    dask_level = dask_logger.level
    for h, _ in handlers:
        h.setLevel(CONSOLE_LEVEL)
    dask_logger.setLevel(CONSOLE_LEVEL)
    preload = [*dask.config.get("distributed.worker.preload", []), WORKER_PRELOAD]
    logging.captureWarnings(True)
    try:
        with dask.config.set({"distributed.worker.preload": preload}):
            yield
    finally:
        logging.captureWarnings(False)
        dask_logger.setLevel(dask_level)
        for h, level in handlers:
            h.setLevel(level)
        for k in set_env:
            os.environ.pop(k, None)


class ProgressBars:
    """A rich progress bar per stage and label (a night, a master, a band);
    nothing when standard output is not a terminal."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not sys.stdout.isatty(),
        )
        self._tasks: dict[tuple[str, str], object] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: Progress) -> None:
        key = (event.stage, event.label)
        if key not in self._tasks:
            self._tasks[key] = self.progress.add_task(
                f"{event.stage} {event.label}", total=event.total, unit=event.unit
            )
        self.progress.update(
            self._tasks[key],  # type: ignore[arg-type]
            completed=event.done,
            total=event.total,
        )

    def counter(self, description: str, total: int, unit: str):
        """An ``advance(_)`` callback for one bar (e.g. the simulator's exposures)."""
        task_id = self.progress.add_task(description, total=total, unit=unit)
        return lambda *_: self.progress.advance(task_id)
