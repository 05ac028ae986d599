"""A night at focal-plane scale through the flow: index, masters, reduce+photometry
on the 64-quadrant ZTF focal plane, per stage wall time, worker CPU and peak
memory, throughput per core, and the projection to a 700-exposure night.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nightly.py --preset ztf --exposures 2 \\
        [--workers 2] [--ccds 16] [--exposures-per-task 1] [--workdir DIR] [--keep] \\
        [--project-workers 16 64 256]

The survey (3 biases, 3 LED flats, ``--exposures`` science exposures, one night)
on ``--ccds`` CCDs of 4 quadrants (16: the whole 64-quadrant focal plane) is
simulated into ``--workdir`` (reused when it is there; deleted at the end
unless ``--keep``: a ZTF exposure is 1.2 GB of FITS and the masters 20 GB of
store). The stages run through ``photocal_run`` on a local Dask cluster of
``--workers`` single-threaded workers (per stage: wall, the workers' CPU, their
peak memory so far). The projection divides the measured science
quadrants per worker-CPU-second into 700 x 64 quadrants for each K in
``--project-workers`` (the masters of a period are built once, not nightly).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

from _cluster import measured_cluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ztf", choices=("tiny", "small", "ztf"))
    p.add_argument("--exposures", type=int, default=2, help="science exposures")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the simulated data and store")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--project-workers", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--ccds", type=int, default=16, help="CCDs simulated (4 quadrants each)")
    p.add_argument(
        "--exposures-per-task", type=int, default=1,
        help="science exposures per photometry task (the stage's default is 4: with few "
        "exposures, one task would hold them all and the other workers idle)",
    )  # fmt: skip
    args = p.parse_args()

    from flows.pipeline import photocal_run
    from sim.config import make_config
    from tasks.reduce import ReduceConfig
    from tasks.simulate import simulate_survey

    work = args.workdir or tempfile.mkdtemp(prefix="photocal-nightly-")
    cfg = make_config(args.preset, seed=args.seed, nights=1)
    if args.ccds < 16:
        cols = tuple(cfg.camera.ccd_cols[: min(4, args.ccds)])
        rows = tuple(cfg.camera.ccd_rows[: max(1, args.ccds // 4)])
        cfg = cfg.replace(camera=dataclasses.replace(cfg.camera, ccd_cols=cols, ccd_rows=rows))
    cfg = cfg.replace(
        schedule=dataclasses.replace(
            cfg.schedule, n_bias=3, n_dark=0, leds_per_band=3, n_flat_per_led=1,
            n_science=args.exposures, bands=("r",),
        )
    )  # fmt: skip
    n_quadrants = len(cfg.camera.ccd_cols) * len(cfg.camera.ccd_rows) * 4
    raw, refcat = os.path.join(work, "sim", "raw"), os.path.join(work, "sim", "refcat.fits")
    try:
        if not os.path.isdir(raw):
            t0 = time.perf_counter()
            sim = simulate_survey(os.path.join(work, "sim"), cfg, jobs=args.workers)
            print(f"simulated {sim.n_files} focal-plane exposures in "
                  f"{time.perf_counter() - t0:.0f} s into {work}")  # fmt: skip
        store = os.path.join(work, f"photocal-{int(time.time())}.zarr")
        print(f"load average {os.getloadavg()[0]:.1f}; {args.workers} workers x 1 thread, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
        with measured_cluster(args.workers) as mc:
            reduce = ReduceConfig(exposures_per_task=args.exposures_per_task)

            def run(stages: list[str]):
                flow = photocal_run.with_options(task_runner=mc.runner_factory())
                return flow(store=store, raw=raw, refcat=refcat, stages=stages, reduce=reduce)

            mc.stage("index", lambda: run(["index"]))
            mc.stage("masters", lambda: run(["masters"]))
            summary = mc.stage("reduce+photometry", lambda: run(["reduce", "photometry"]))
        print(mc.table())
        counts = next(iter(summary["photometry"].values()))
        n_exp = counts["exposures"]
        phot = mc.stages[-1]
        n_q = n_exp * n_quadrants
        cpu = sum(phot.worker_cpu_s)
        per_core = n_q / cpu
        print(f"reduce+photometry: {n_exp} exposures x {n_quadrants} quadrants = {n_q} "
              f"quadrants, {counts['observations']} observations ({counts['clean']} clean); "
              f"{cpu / n_q:.2f} worker-CPU s per quadrant")  # fmt: skip
        night = 700 * 64
        for k in args.project_workers:
            print(f"projection: a 700-exposure night ({night} quadrants) on {k} one-core workers "
                  f"~ {night / (per_core * k) / 3600:.2f} h of reduce+photometry")  # fmt: skip
        peak = max(max(s.worker_peak_gb) for s in mc.stages)
        total_wall = sum(s.wall_s for s in mc.stages)
        print(
            f"nightly: {n_q} quadrants in {total_wall:.0f} s on {args.workers} workers, "
            f"{per_core:.3f} quadrants/s per core, worker peak {peak:.2f} GB"
        )
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for name in os.listdir(work):
                if name.endswith((".zarr", ".zarr.qa")):
                    shutil.rmtree(os.path.join(work, name), ignore_errors=True)


if __name__ == "__main__":
    main()
