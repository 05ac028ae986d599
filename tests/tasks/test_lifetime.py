"""tasks/lifetime.py: when a worker drains, and a drain on a real (in-process)
Dask cluster: the running task finishes once on the leaving worker and its
result reaches the other worker, so it is not computed again."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from distributed.core import Status

from tasks.lifetime import drain, drain_delay_s


def test_drain_delay_is_within_the_stagger_and_never_below_a_second():
    rng = random.Random(0)
    delays = [drain_delay_s(100.0, 10.0, rng) for _ in range(2000)]
    assert 90.0 <= min(delays) < 91.0  # 2000 uniform draws reach within 1 % of each end
    assert 109.0 < max(delays) <= 110.0
    assert drain_delay_s(2.0, 1.9, random.Random(1)) >= 1.0
    assert drain_delay_s(5.0, 0.0) == 5.0


@pytest.mark.parametrize(
    ("after", "stagger", "word"),
    [(0.0, 0.0, "--drain-after"), (-5.0, 0.0, "--drain-after"), (10.0, 10.0, "--drain-stagger")],
)
def test_drain_delay_refuses_bad_arguments(after, stagger, word):
    with pytest.raises(ValueError, match=word):
        drain_delay_s(after, stagger)


def _slow(log: str, seconds: float) -> str:
    """A task that records its start and end in ``log``."""
    with open(log, "a") as fh:
        fh.write(f"start {time.time():.3f}\n")
    time.sleep(seconds)
    with open(log, "a") as fh:
        fh.write(f"done {time.time():.3f}\n")
    return "result"


async def _drain_while_running(log: Path) -> tuple[str, Status, float]:
    """Start a 1.5 s task on one of two workers, drain that worker while the task
    runs, and return the task's result, the worker's status and when it closed."""
    async with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            asynchronous=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        leaving, _ = cluster.workers.values()
        future = client.submit(_slow, str(log), 1.5, workers=[leaving.address], pure=False)
        while not leaving.state.executing:
            await asyncio.sleep(0.01)
        assert await drain(leaving, timeout_s=30)  # the other worker took the result
        closed = time.time()
        return await future, leaving.status, closed


def _events(log: Path, kind: str) -> list[float]:
    return [float(t) for k, t in (ln.split() for ln in log.read_text().splitlines()) if k == kind]


def test_a_draining_worker_finishes_its_task_and_hands_the_result_over(tmp_path):
    log = tmp_path / "task.log"
    result, status, closed = asyncio.run(_drain_while_running(log))
    assert result == "result"
    assert status == Status.closed
    # Started once, finished once, before the worker left: not computed again.
    assert len(_events(log, "start")) == 1
    assert len(_events(log, "done")) == 1
    assert _events(log, "done")[0] <= closed


async def _drain_alone_until_a_peer_starts(log: Path) -> tuple[list[str], bool, float]:
    """One worker, a task finished on it, its drain begun: no peer can take the
    result, so it works on (a second task runs on it) until a second worker has
    started and takes the results. Returns the tasks' results, whether the drain
    handed them over and how long it took."""
    async with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            asynchronous=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        (alone,) = cluster.workers.values()
        first = client.submit(_slow, str(log), 0.2, pure=False)
        await first  # held by the worker that is about to leave
        t0 = time.monotonic()
        draining = asyncio.ensure_future(drain(alone, timeout_s=60, retry_s=0.5))
        while alone.status != Status.closing_gracefully:  # the drain began
            await asyncio.sleep(0.01)
        while alone.status != Status.running:  # no peer: back to work
            await asyncio.sleep(0.01)
        second = client.submit(_slow, str(log), 0.2, pure=False)
        await second
        await cluster.scale(2)
        handed = await draining
        return [await first, await second], handed, time.monotonic() - t0


def test_a_worker_without_a_peer_works_on_until_one_takes_its_results(tmp_path):
    log = tmp_path / "task.log"
    results, handed, took = asyncio.run(_drain_alone_until_a_peer_starts(log))
    assert results == ["result", "result"]
    assert handed, "the drain left without handing the results over"
    assert took < 30  # the peer took them at a retry, not at the 60 s timeout
    # Each task computed once: the results moved instead of being computed again.
    assert len(_events(log, "start")) == 2


def test_the_slurm_spec_starts_its_workers_with_the_drain():
    """The slurm spec's worker arguments, as dask-jobqueue appends them to
    ``dask worker``, parse: the preload is tasks.lifetime and its options reach
    its own command, with the drain 10 min before the 4 h walltime at most."""
    import yaml
    from dask.utils import parse_timedelta
    from distributed.cli.dask_worker import main as dask_worker

    from tasks.lifetime import dask_setup

    spec = yaml.safe_load(Path("infra/clusters/slurm.yaml").read_text())["cluster_kwargs"]
    args = ["tcp://127.0.0.1:8786", "--nthreads", "1", "--nanny", *spec["worker_extra_args"]]
    parsed = dask_worker.make_context("worker", args).params
    assert parsed["preload"] == ("tasks.lifetime",)
    options = dask_setup.make_context("dask_setup", list(parsed["preload_argv"])).params
    walltime_s = sum(int(p) * 60**i for i, p in enumerate(reversed(spec["walltime"].split(":"))))
    latest = parse_timedelta(options["drain_after"]) + parse_timedelta(options["drain_stagger"])
    assert latest + parse_timedelta(options["drain_timeout"]) <= walltime_s - 600
    assert "--lifetime" not in spec["worker_extra_args"]  # Dask's own: no drain
