"""Master combination: photocal's ``ccdproc`` mode against ccdproc itself.

    python benchmarks/masters.py                 # 20 frames of one ZTF quadrant
    python benchmarks/masters.py --focal-plane   # + the Dask stage on the full
                                                 #   64-quadrant focal plane

Part 1: a stack of 20 float32 frames of 3080 x 3072 pixels (bias-like, with
cosmic rays and NaNs), combined by ``calib.masters.combine_frames(mode="ccdproc")``
and by ``ccdproc.combine(..., method="average", sigma_clip=True)`` with its
default memory limit, in this process. Prints both times, their ratio, the largest
relative difference, and our peak memory (tracemalloc, stack included) relative to
the stack size.

Part 2 (``--focal-plane``): simulates the ``ztf`` preset's calibration frames
(64 quadrants) and runs the masters stage through the Prefect flow on a local Dask
cluster; prints frame-megapixels per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
import warnings

import numpy as np


def make_stack(n: int, ny: int, nx: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stack = (1000.0 + rng.normal(0.0, 1.4, size=(n, ny, nx))).astype(np.float32)
    hits = rng.integers(0, stack.size, size=n * 2000)
    stack.flat[hits] += rng.uniform(100, 5e4, size=hits.size).astype(np.float32)
    # No NaNs: ccdproc.combine's default clipping (np.ma.mean centre) masks a whole
    # pixel when one frame is NaN there, unlike Combiner.sigma_clipping(func="mean")
    # whose semantics we follow (tests/calib/test_masters.py covers NaNs).
    return stack


def ours(stack: np.ndarray):
    from calib.masters import combine_frames

    return combine_frames(stack, mode="ccdproc")


def peer(stack: np.ndarray):
    import ccdproc
    from astropy.nddata import CCDData

    ccds = [CCDData(frame, unit="adu") for frame in stack]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ccdproc.combine(
            ccds,
            method="average",
            sigma_clip=True,
            sigma_clip_low_thresh=3,
            sigma_clip_high_thresh=3,
        )


def single_quadrant(n: int, ny: int, nx: int) -> None:
    stack = make_stack(n, ny, nx)
    size_mb = stack.nbytes / 2**20
    print(f"stack: {n} x {ny} x {nx} float32 = {size_mb:.0f} MiB")
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    ours_result = ours(stack)
    t_ours = time.perf_counter() - t0
    peak_extra = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    t0 = time.perf_counter()
    peer_result = peer(stack)
    t_peer = time.perf_counter() - t0
    both = np.isfinite(peer_result.data) & np.isfinite(ours_result.center)
    rel = np.abs(ours_result.center[both] - peer_result.data[both]) / np.abs(peer_result.data[both])
    same_mask = np.array_equal(np.isfinite(peer_result.data), np.isfinite(ours_result.center))
    print(f"photocal ccdproc mode: {t_ours:8.2f} s")
    print(f"ccdproc.combine:       {t_peer:8.2f} s")
    print(f"speed-up:              {t_peer / t_ours:8.1f} x   (target >= 10 x)")
    print(f"max relative difference: {rel.max():.2e}  (masks identical: {same_mask})")
    total = size_mb + peak_extra
    print(
        f"peak memory: stack {size_mb:.0f} MiB + {peak_extra:.0f} MiB working = "
        f"{total / size_mb:.2f} x the stack   (target <= 2 x)"
    )


def focal_plane(workers: int, workdir: str | None) -> None:
    import dataclasses
    import os

    from flows.api import prefect_api
    from flows.pipeline import photocal_run
    from flows.runners import make_task_runner
    from sim.config import make_config
    from tasks.masters import MastersConfig
    from tasks.simulate import simulate_survey

    work = workdir or tempfile.mkdtemp(prefix="photocal-bench-")
    cfg = make_config("ztf", seed=1)
    cfg = cfg.replace(
        schedule=dataclasses.replace(cfg.schedule, n_bias=3, n_flat_per_led=1, n_science=1)
    )
    raw = os.path.join(work, "sim", "raw")
    if not os.path.isdir(raw):
        t0 = time.perf_counter()
        sim = simulate_survey(work + "/sim", cfg, jobs=workers)
        print(f"simulated {sim.n_files} focal-plane exposures in {time.perf_counter() - t0:.0f} s")
    store = os.path.join(work, f"photocal-{int(time.time())}.zarr")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_api():
        run = photocal_run.with_options(task_runner=make_task_runner(workers=workers))
        run(store=store, raw=raw, stages=["index"])
        t0 = time.perf_counter()
        run(store=store, raw=raw, stages=["masters"], masters=MastersConfig())
        wall = time.perf_counter() - t0
    sch = cfg.schedule
    n_frames = sch.n_bias + sch.leds_per_band * sch.n_flat_per_led * len(sch.bands)
    # Flats are read twice (levels, then combination).
    n_reads = sch.n_bias + 2 * (n_frames - sch.n_bias)
    mpix = 64 * cfg.camera.quad_nx * cfg.camera.quad_ny / 1e6
    print(
        f"masters stage, {workers} Dask workers: {n_frames} frames x {mpix:.0f} Mpix "
        f"in {wall:.0f} s = {n_frames * mpix / wall:.1f} frame-Mpix/s "
        f"({n_reads * mpix / wall:.1f} Mpix/s read)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--ny", type=int, default=3080)
    p.add_argument("--nx", type=int, default=3072)
    p.add_argument("--focal-plane", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=None, help="reuse a simulated ztf survey in this folder")
    args = p.parse_args()
    single_quadrant(args.frames, args.ny, args.nx)
    if args.focal_plane:
        focal_plane(args.workers, args.workdir)


if __name__ == "__main__":
    main()
