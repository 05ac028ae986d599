"""The ubercal stage at survey scale through the command line: a store of night
catalogs (the season-scale survey of benchmarks/ubercal_scale.py, written night
by night with tasks.simulate.write_catalog_survey) totalling tens of millions
of observations, calibrated by ``photocal run --stages ubercal`` as an operator
would run it: the Prefect flow on its local Dask cluster, the stage's default
options (the model sized to the data, the solver picked by size), each night's
catalog read by the workers.

Measured: wall time of the command, CPU time and peak memory of its processes
(ru_maxrss of the largest: the flow process or a Dask worker), the fit's
statistics from the group's attrs, and the stored zero points against the
truth (gauge offset removed) with the pull rms on the stored errors.

Run: ``.venv/bin/python benchmarks/ubercal_stage.py [--obs 3e7] [--workdir DIR]``.
The last line is
``ubercal stage: <N_obs> obs, <N_zp> zero points, <wall> s, <peak> GB, pull rms <p>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sim.catalogsim import plan_catalog_survey
from tasks.io.store import read_group
from tasks.simulate import write_catalog_refcat, write_catalog_survey

sys.path.insert(0, str(Path(__file__).parent))
from ubercal_scale import load, survey_config, zp_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--obs", type=float, default=3e7, help="observations of the survey")
    ap.add_argument("--workdir", type=Path, help="keep the store here (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="ubercal_stage_")
        work = Path(tmp)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        run(args.obs, args.seed, work)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(n_obs: float, seed: int, work: Path) -> None:
    store, refcat = work / "store.zarr", work / "refcat.fits"
    plan = plan_catalog_survey(survey_config(n_obs, seed))
    t0 = time.perf_counter()
    if not (store / "nights").exists():
        write_catalog_survey(store, plan)
        write_catalog_refcat(refcat, plan)
    nights = sorted(set(plan.exposures["night"]))
    print(
        f"store: {len(nights)} nights, {plan.n_exposures:,} exposures, 64 quadrants "
        f"({time.perf_counter() - t0:.0f} s to generate and write); {load()}",
        flush=True,
    )
    cmd = [
        str(Path(sys.executable).with_name("photocal")),
        "run",
        "--store",
        str(store),
        "--refcat",
        str(refcat),
        "--stages",
        "ubercal",
    ]
    print("command:", " ".join(cmd), flush=True)
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect")}
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"photocal run failed with exit code {proc.returncode}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    peak_gb = after.ru_maxrss / 1e6
    print("\n".join(line for line in proc.stdout.splitlines() if "ubercal" in line))
    ds = read_group(store, f"ubercal/{plan.config.band}")
    st = ds.attrs["fit_statistics"]
    acc = zp_accuracy(plan, ds.expid.values, ds.quadrant.values, ds.zp.values, ds.zp_err.values)
    n_zp = int(np.isfinite(ds.zp.values).sum())
    print(
        f"fit: {st['n_obs']:,} observations, {n_zp:,} zero points, solver {st['solver']}, "
        f"{st['iterations']} passes, CG iterations per solve {st['cg_iterations_per_solve']}, "
        f"chi2/dof {st['chi2_per_dof']:.3f}; model {ds.attrs['sizing']}"
    )
    print(
        f"command: {wall:.0f} s wall, {cpu:.0f} s CPU (all processes), peak RSS {peak_gb:.2f} GB "
        f"(largest process); zero points vs truth {acc['zp_rms_mmag']:.3f} mmag rms, median "
        f"error {acc['zp_err_mmag']:.3f} mmag, pull rms {acc['pull_rms']:.2f}; {load()}"
    )
    print(
        f"ubercal stage: {st['n_obs']} obs, {n_zp} zero points, {wall:.0f} s, "
        f"{peak_gb:.1f} GB, pull rms {acc['pull_rms']:.2f}"
    )


if __name__ == "__main__":
    main()
