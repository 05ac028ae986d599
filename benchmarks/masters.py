"""Master combination: photocal's ``ccdproc`` mode against ccdproc itself.

    OMP_NUM_THREADS=1 python benchmarks/masters.py     # 20 frames of one ZTF quadrant
    OMP_NUM_THREADS=1 python benchmarks/masters.py --focal-plane [--fp-frames 60] [--ccds 16]

Part 1: a stack of 20 float32 frames of 3080 x 3072 pixels (bias-like, with
cosmic rays), combined by ``calib.masters.combine_frames(mode="ccdproc")`` and by
``ccdproc.combine(..., method="average", sigma_clip=True)`` with its default
memory limit, in this process. Prints both times (CPU seconds of this process,
best of ``--repeat`` for ours; wall beside), their ratio, the largest relative
difference, and our peak memory (tracemalloc, stack included) relative to the
stack size.

Part 2 (``--focal-plane``): simulates ``--fp-frames`` calibration frames of the
``ztf`` preset (biases and one LED flat; ``--ccds`` CCDs of 4 full-size quadrants
each, 16 for the whole focal plane: 1.2 GB of FITS per frame) and runs the masters
stage through the Prefect flow on a local Dask cluster of ``--workers``
single-threaded workers; prints frame-megapixels per second per core and each
worker's peak memory (``ru_maxrss``) against ``MastersConfig.memory_budget_gb``.
"""

from __future__ import annotations

import argparse
import os
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


def single_quadrant(n: int, ny: int, nx: int, repeat: int) -> None:
    stack = make_stack(n, ny, nx)
    size_mb = stack.nbytes / 2**20
    print(f"stack: {n} x {ny} x {nx} float32 = {size_mb:.0f} MiB; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    ours_result = ours(stack)
    peak_extra = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    c_ours, w_ours = float("inf"), float("inf")
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        ours(stack)
        c_ours, w_ours = (
            min(c_ours, time.process_time() - c0),
            min(w_ours, time.perf_counter() - w0),
        )
    c0, w0 = time.process_time(), time.perf_counter()
    peer_result = peer(stack)
    c_peer, w_peer = time.process_time() - c0, time.perf_counter() - w0
    both = np.isfinite(peer_result.data) & np.isfinite(ours_result.center)
    rel = np.abs(ours_result.center[both] - peer_result.data[both]) / np.abs(peer_result.data[both])
    same_mask = np.array_equal(np.isfinite(peer_result.data), np.isfinite(ours_result.center))
    print(f"photocal ccdproc mode: {c_ours:8.2f} s CPU ({w_ours:.2f} s wall)")
    print(f"ccdproc.combine:       {c_peer:8.2f} s CPU ({w_peer:.2f} s wall)")
    print(f"max relative difference: {rel.max():.2e}  (masks identical: {same_mask})")
    total = size_mb + peak_extra
    print(
        f"peak memory: stack {size_mb:.0f} MiB + {peak_extra:.0f} MiB working = "
        f"{total / size_mb:.2f} x the stack   (target <= 2 x)"
    )
    print(f"speed-up: {c_peer / c_ours:.1f} x   (CPU seconds; target >= 20 x)")


def _replicate_biases(raw: str, n_bias: int) -> None:
    """Copies of the simulated biases, each with its own EXPID and time, up to
    ``n_bias``: the I/O and memory of a large stack without simulating every frame
    (the values repeat, so the clipping has less to do than on real frames)."""
    import glob
    import shutil

    from astropy.io import fits

    biases = sorted(glob.glob(os.path.join(raw, "**", "*bias*.fits"), recursive=True))
    for k in range(len(biases), n_bias):
        source = biases[k % len(biases)]
        target = source.replace(".fits", f"_copy{k:03d}.fits")
        shutil.copyfile(source, target)
        with fits.open(target, mode="update") as hdul:
            hdul[0].header["EXPID"] = 900_000_000 + k
            hdul[0].header["MJD-OBS"] = hdul[0].header["MJD-OBS"] + 1e-4 * k
    print(f"{n_bias} biases: {len(biases)} simulated, the others copies")


def focal_plane(
    workers: int, workdir: str | None, frames: int, ccds: int, keep: bool, replicate: int
) -> None:
    import dataclasses
    import os
    import shutil

    from _cluster import measured_cluster

    from flows.pipeline import photocal_run
    from sim.config import make_config
    from tasks.masters import MastersConfig
    from tasks.simulate import simulate_survey

    work = workdir or tempfile.mkdtemp(prefix="photocal-bench-")
    cfg = make_config("ztf", seed=1)
    side = tuple(range(1, 1 + min(4, ccds)))
    rows = tuple(range(1, 1 + max(1, ccds // 4)))
    simulated = min(frames - 1, replicate or frames - 1)
    cfg = cfg.replace(
        camera=dataclasses.replace(cfg.camera, ccd_cols=side, ccd_rows=rows),
        schedule=dataclasses.replace(
            cfg.schedule, n_bias=simulated, leds_per_band=1, n_flat_per_led=1, n_science=0,
            n_dark=0,
        ),
    )  # fmt: skip
    raw = os.path.join(work, "sim", "raw")
    store = os.path.join(work, f"photocal-{int(time.time())}.zarr")
    try:
        if not os.path.isdir(raw):
            t0 = time.perf_counter()
            sim = simulate_survey(work + "/sim", cfg, jobs=workers)
            print(f"simulated {sim.n_files} frames in {time.perf_counter() - t0:.0f} s")
            if simulated < frames - 1:
                _replicate_biases(raw, frames - 1)
        config = MastersConfig()
        with measured_cluster(workers) as mc:

            def run(stages: list[str]):
                flow = photocal_run.with_options(task_runner=mc.runner_factory())
                return flow(store=store, raw=raw, stages=stages, masters=config)

            mc.stage("index", lambda: run(["index"]))
            mc.stage("masters", lambda: run(["masters"]))
        print(mc.table())
        masters = mc.stages[-1]
        n_quadrants = len(side) * len(rows) * 4
        mpix = n_quadrants * cfg.camera.quad_nx * cfg.camera.quad_ny / 1e6
        # The flat is read twice (its level, then the combination).
        n_reads = frames + 1
        cpu = sum(masters.worker_cpu_s)
        peak = max(masters.worker_peak_gb)
        print(f"masters stage, {workers} Dask workers: {frames} frames x {mpix:.0f} Mpix in "
              f"{masters.wall_s:.0f} s = {frames * mpix / masters.wall_s / workers:.1f} "
              f"frame-Mpix/s per core (wall), {frames * mpix / cpu:.1f} per worker-CPU s "
              f"({n_reads * mpix / masters.wall_s:.1f} Mpix/s read)")  # fmt: skip
        print(f"worker peak memory {peak:.2f} GB (budget {config.memory_budget_gb:.1f} GB, "
              f"limit {config.memory_budget_gb + 0.5:.1f} GB)")  # fmt: skip
    finally:
        if not keep and not workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not keep:  # a kept --workdir keeps its simulated frames for the next run
            shutil.rmtree(store, ignore_errors=True)


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
    p.add_argument("--repeat", type=int, default=3, help="best of N for ours")
    p.add_argument("--fp-frames", type=int, default=60, help="frames of the focal-plane mode")
    p.add_argument("--ccds", type=int, default=16, help="CCDs (4 quadrants each) simulated")
    p.add_argument("--keep", action="store_true", help="keep the simulated frames")
    p.add_argument("--skip-quadrant", action="store_true", help="only the focal-plane mode")
    p.add_argument(
        "--replicate", type=int, default=0,
        help="simulate only this many biases and copy them up to --fp-frames (0: simulate all)",
    )  # fmt: skip
    args = p.parse_args()
    if not args.skip_quadrant:
        single_quadrant(args.frames, args.ny, args.nx, args.repeat)
    if args.focal_plane:
        focal_plane(
            args.workers, args.workdir, args.fp_frames, args.ccds, args.keep, args.replicate
        )


if __name__ == "__main__":
    main()
