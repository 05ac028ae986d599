"""Progress of long work, for whoever watches it: the command line draws bars
(flows/console.py), a backfill keeps its progress artifact (flows/deployments.py).

Flows and tasks *report* (:func:`emit`, :func:`track`); *listeners* decide what to
show. A report from inside a task running on a Dask worker travels to the flow's
process as a Dask event (topic :data:`TOPIC`), forwarded to the listeners that
asked for remote events while :func:`forward_from_workers` is active. Reporting
never fails the work it describes: a listener that raises is logged and dropped
from that event.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

TOPIC = "photocal-progress"

F = TypeVar("F")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` ``unit`` of ``stage`` for ``label`` (a night, a
    group, a band)."""

    stage: str
    label: str
    done: int
    total: int
    unit: str = ""


Listener = Callable[[Progress], None]

_lock = threading.Lock()
_listeners: list[tuple[Listener, bool]] = []


@contextmanager
def listening(listener: Listener, *, remote: bool = False) -> Iterator[Listener]:
    """Deliver progress to ``listener`` inside the block; with ``remote``, also
    what tasks report from Dask workers (delivered on the Dask client's thread,
    so the listener must be quick and thread-safe)."""
    entry = (listener, remote)
    with _lock:
        _listeners.append(entry)
    try:
        yield listener
    finally:
        with _lock:
            _listeners.remove(entry)


def _deliver(event: Progress, *, remote: bool) -> None:
    with _lock:
        targets = [fn for fn, wants_remote in _listeners if wants_remote or not remote]
    for fn in targets:
        try:
            fn(event)
        except Exception:
            _log.warning("progress listener %r failed on %s", fn, event, exc_info=True)


def _worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def emit(stage: str, label: str, done: int, total: int, unit: str = "") -> None:
    """Report progress: to this process's listeners, or from a Dask worker to
    the flow's process."""
    event = Progress(stage, label, int(done), int(total), unit)
    worker = _worker()
    if worker is not None:
        worker.log_event(TOPIC, dataclasses.asdict(event))
        return
    _deliver(event, remote=False)


def track(futures: Sequence[F], stage: str, label: str, unit: str) -> Sequence[F]:
    """Wait for Prefect futures, reporting each completion; returns them as given."""
    from prefect.futures import as_completed

    emit(stage, label, 0, len(futures), unit)
    for k, _ in enumerate(as_completed(list(futures)), start=1):
        emit(stage, label, k, len(futures), unit)
    return futures


def _flow_dask_client() -> Any:
    """The Dask client of the running flow's task runner, if it is a Dask one."""
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    return runner.client if isinstance(runner, DaskTaskRunner) else None


@contextmanager
def forward_from_workers() -> Iterator[None]:
    """Inside a flow on a Dask task runner: deliver what tasks report on the
    workers to the listeners that take remote events."""
    client = _flow_dask_client()
    if client is None:
        yield
        return

    fields = {f.name for f in dataclasses.fields(Progress)}

    def handler(event: tuple[float, dict[str, Any]]) -> None:
        # Dask adds the emitting worker's address to the message.
        _deliver(Progress(**{k: v for k, v in event[1].items() if k in fields}), remote=True)

    client.subscribe_topic(TOPIC, handler)
    try:
        yield
    finally:
        client.unsubscribe_topic(TOPIC)
