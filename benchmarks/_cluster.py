"""A measured local Dask cluster for the stage benchmarks: the flow runs on it
through Prefect's Dask task runner, and each worker's peak memory (``ru_maxrss``)
and CPU seconds are read back before and after each stage. Workers are not
restarted between stages (on a loaded machine a restart did not come back within
15 minutes): a stage's CPU is the difference, its peak the workers' peak so far."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


def _worker_usage() -> tuple[float, float]:
    """(peak RSS bytes, CPU seconds) of the calling process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss * 1024.0, usage.ru_utime + usage.ru_stime


@dataclass
class StageMeasure:
    name: str
    wall_s: float
    worker_peak_gb: list[float]
    worker_cpu_s: list[float]


@dataclass
class MeasuredCluster:
    runner_factory: Callable[[], Any]
    client: Any
    workers: int
    stages: list[StageMeasure]

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a flow call) and record its measures."""
        before = self.client.run(_worker_usage)
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        after = self.client.run(_worker_usage)
        self.stages.append(
            StageMeasure(
                name,
                wall,
                [u[0] / 1e9 for u in after.values()],
                [after[w][1] - before.get(w, (0.0, 0.0))[1] for w in after],
            )
        )
        return out

    def table(self) -> str:
        head = f"{'stage':<22}{'wall s':>9}{'worker CPU s':>14}{'peak so far GB':>16}"
        rows = [
            f"{s.name:<22}{s.wall_s:>9.1f}{sum(s.worker_cpu_s):>14.1f}"
            f"{max(s.worker_peak_gb):>16.2f}"
            for s in self.stages
        ]
        return "\n".join([head, *rows])


@contextmanager
def measured_cluster(workers: int, *, memory_limit: str = "auto") -> Iterator[MeasuredCluster]:
    """``workers`` single-threaded worker processes (one core each), with the
    embedded Prefect API; ``runner_factory()`` gives the flow's task runner."""
    from distributed import Client, LocalCluster

    from flows.api import prefect_api
    from flows.runners import make_task_runner

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with (
        prefect_api(),
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
            host="127.0.0.1", dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        address = cluster.scheduler_address
        yield MeasuredCluster(
            runner_factory=lambda: make_task_runner(dask_address=address),
            client=client,
            workers=workers,
            stages=[],
        )
