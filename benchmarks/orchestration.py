"""Orchestration overhead: the `small` preset's per-night stages (index, masters,
reduce + photometry) through the Prefect flow on Dask, against the same functions
called in a plain loop.

    python benchmarks/orchestration.py [--workdir DIR]

The flow runs with ONE Dask worker so that parallelism does not hide overhead;
the embedded Prefect API is started before timing (production has a server
running), the Dask cluster start-up is counted. Prints both wall times and the
overhead as a fraction of the flow's wall time (target < 15 %), and the flow's
time with two workers for reference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def plain_loop(raw: str, store: str, refcat: str) -> None:
    """The per-night stages with no Prefect and no Dask: the same functions, in order."""
    from tasks.index import index_sequentially
    from tasks.masters import build_masters_sequentially
    from tasks.reduce import reduce_night

    nights = index_sequentially(raw, store)
    build_masters_sequentially(store)
    for night in nights:
        reduce_night(store, night, refcat, raw_root=raw)


def through_flow(raw: str, store: str, refcat: str, workers: int) -> None:
    from flows.pipeline import NIGHTLY_STAGES, photocal_run
    from flows.runners import make_task_runner

    photocal_run.with_options(task_runner=make_task_runner(workers=workers))(
        store=store, raw=raw, refcat=refcat, stages=list(NIGHTLY_STAGES)
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="photocal-orch-"))
    from flows.api import prefect_api
    from tasks.simulate import simulate_survey

    raw = work / "sim" / "raw"
    refcat = str(work / "sim" / "refcat.fits")
    if not raw.is_dir():
        t0 = time.perf_counter()
        simulate_survey(work / "sim", preset="small", jobs=2)
        print(f"simulated the small preset in {time.perf_counter() - t0:.0f} s")
    with prefect_api():
        t0 = time.perf_counter()
        plain_loop(str(raw), str(work / "loop.zarr"), refcat)
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        through_flow(str(raw), str(work / "flow1.zarr"), refcat, workers=1)
        t_flow = time.perf_counter() - t0
        t0 = time.perf_counter()
        through_flow(str(raw), str(work / "flow2.zarr"), refcat, workers=2)
        t_flow2 = time.perf_counter() - t0
    overhead = (t_flow - t_loop) / t_flow
    print(f"plain loop (no Prefect, no Dask):  {t_loop:7.1f} s")
    print(f"Prefect flow, 1 Dask worker:       {t_flow:7.1f} s")
    print(
        f"orchestration overhead:            {100 * overhead:7.1f} % of the flow's wall time "
        "(target < 15 %)"
    )
    print(
        f"Prefect flow, 2 Dask workers:      {t_flow2:7.1f} s  ({t_loop / t_flow2:.2f} x the loop)"
    )


if __name__ == "__main__":
    main()
