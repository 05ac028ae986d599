"""Workers that leave before their job's walltime without losing work: a Dask
worker preload.

    dask worker SCHEDULER --preload tasks.lifetime --drain-after 230m --drain-stagger 4m

Dask's own ``--lifetime`` retires a worker at its lifetime without waiting for
the task it is running: the scheduler starts that task again on another worker
(the first run's result is thrown away), so with a lifetime shorter than a task
nothing ever finishes, and a worker that finds no running peer to hand its
results to drops them (docs/reliability.md has the measurements). This preload
*drains* instead: at ``--drain-after`` (plus or minus ``--drain-stagger``, drawn
once per worker) the worker stops taking tasks, lets the ones it is running
finish, then retires as Dask's lifetime does: its results go to the other
workers, and it closes with its nanny, so that a batch job ends and adaptive
scaling starts a replacement. With no peer to take the results (the others
leaving too, or still starting), it works on and tries again every
``--drain-retry``; at ``--drain-timeout`` after the drain began it leaves
whatever the state.

Keep ``--drain-after`` + ``--drain-stagger`` + ``--drain-timeout`` below the
walltime (the slurm spec leaves 10 min).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import click
from dask.utils import parse_timedelta
from distributed import Worker
from distributed.core import Status

logger = logging.getLogger(__name__)

DRAIN_REASON = "photocal-drain"
"""The stimulus-id prefix of a drain's retirement (the scheduler's event log
``retire-workers`` records it)."""


def drain_delay_s(after_s: float, stagger_s: float, rng: random.Random | None = None) -> float:
    """When one worker drains: ``after_s`` shifted by a uniform draw in
    ``[-stagger_s, +stagger_s]``, never before one second."""
    if after_s <= 0:
        raise ValueError(f"--drain-after must be positive, got {after_s} s")
    if not 0 <= stagger_s < after_s:
        raise ValueError(
            f"--drain-stagger must be >= 0 and below --drain-after ({after_s} s), got {stagger_s} s"
        )
    draw = (rng or random).uniform(-stagger_s, stagger_s)
    return max(1.0, after_s + draw)


async def _finish_running(worker: Worker, deadline: float) -> None:
    """Stop taking tasks and wait for the running ones, at most to ``deadline``
    (``time.monotonic``). Not Status.paused: the memory monitor un-pauses a
    paused worker as soon as its memory is low; closing_gracefully also tells
    the scheduler to send no more."""
    worker.status = Status.closing_gracefully
    logger.info("%s: draining (%d task(s) running)", worker.address, len(worker.state.executing))
    while worker.state.executing and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def drain(
    worker: Worker, *, timeout_s: float, retry_s: float = 30.0, rng: random.Random | None = None
) -> bool:
    """Stop taking tasks, wait for the running ones, hand the results over to a
    running peer and close the worker and its nanny, all within ``timeout_s``;
    True when a peer took the results.

    When no other worker can take them (all of them leaving at once, or the
    replacement of the last one to leave still starting), the worker goes back
    to work and tries again after ``retry_s`` (+-50 %, so that two workers
    leaving together do not keep colliding), until the timeout; then it leaves
    anyway and its results are computed again once a replacement is up, as with
    Dask's own lifetime (photometry chunks are kept in the store, so for them
    that costs a read: tasks/resume.py).
    """
    if worker.status not in (Status.running, Status.paused):
        return False
    rng = rng or random.Random()
    deadline = time.monotonic() + timeout_s
    while True:
        await _finish_running(worker, deadline)
        handed_over = not worker.state.executing and await _retire(worker)
        left_s = deadline - time.monotonic()
        if handed_over or left_s <= 0:
            break
        # The aborted retirement sends this worker its status back; let it
        # arrive before changing the status again.
        await asyncio.sleep(0.5)
        logger.info("%s: no running peer took the results; working on", worker.address)
        worker.status = Status.running
        await asyncio.sleep(min(left_s, retry_s * rng.uniform(0.5, 1.5)))
    if not handed_over:
        logger.warning(
            "%s: drain timeout (%.0f s) reached with %d task(s) running and no peer "
            "to take the results; leaving anyway",
            worker.address,
            timeout_s,
            len(worker.state.executing),
        )
        await asyncio.sleep(0.5)  # as above: an aborted retirement's status first
    await worker.close(nanny=True, reason=DRAIN_REASON)
    return handed_over


async def _retire(worker: Worker) -> bool:
    """What Worker.close_gracefully does (it returns at once for a worker already
    closing_gracefully): the results to running peers; False when none took them."""
    retired = await worker.scheduler.retire_workers(
        workers=[worker.address],
        close_workers=False,
        remove=True,
        stimulus_id=f"{DRAIN_REASON}-{time.time()}",
    )
    return worker.address in retired


@click.command()
@click.option("--drain-after", required=True, help="time until the worker drains, e.g. 230m")
@click.option("--drain-stagger", default="0s", show_default=True, help="+- spread per worker")
@click.option(
    "--drain-timeout",
    default="10m",
    show_default=True,
    help="longest drain: running tasks to finish and a peer to take the results",
)
@click.option(
    "--drain-retry",
    default="30s",
    show_default=True,
    help="while no peer can take the results: work on and try again after this",
)
def dask_setup(
    worker: Worker, drain_after: str, drain_stagger: str, drain_timeout: str, drain_retry: str
) -> None:
    """Schedule this worker's drain (called by Dask when the worker starts)."""
    delay = drain_delay_s(parse_timedelta(drain_after), parse_timedelta(drain_stagger))
    timeout_s, retry_s = parse_timedelta(drain_timeout), parse_timedelta(drain_retry)
    logger.info("%s: drains in %.0f s", worker.address, delay)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def start() -> None:
        task = loop.create_task(drain(worker, timeout_s=timeout_s, retry_s=retry_s))
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    loop.call_later(delay, start)
