"""Ubercal benchmark on a realistic tiled survey generated at catalog level
(sim.catalogsim): 16-quadrant focal plane at ZTF quadrant size, fields tiled with
3 % overlap, dithered visits over several nights, the ``ztf`` preset's star
density and photometric errors.

1. At ~10 million observations: the full solve (outlier iterations included)
   in a fresh process, wall time and peak memory (ru_maxrss); zero points against
   an independent fully converged solve of the same system (sparse LU, Schur
   complement rebuilt from scratch); errors against the truth next to the
   solution's own error estimates; size of the large-scale modes.
2. Side by side at a size LSQR can finish: plain ``scipy.sparse.linalg.lsqr``
   on the full weighted design matrix (stars + zero points + starflat cells +
   gradients + reference prior), started from the star means, run with
   growing iteration limits until its zero points agree with the direct solve to
   0.1 mmag rms (gauge removed), or a cap; times and ratio printed.

Run: ``.venv/bin/python benchmarks/ubercal.py`` (add ``--quick`` for a small run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg

from calib.ubercal import (
    InMemoryObservations,
    ObservationChunk,
    ReferenceStars,
    UbercalOptions,
    UbercalSolution,
    build_layout,
    solve_ubercal,
)
from calib.ubercal.gauge import anchor_stars, prior_equations
from sim.catalogsim import CatalogSurvey, CatalogSurveyConfig, simulate_catalog_survey

AGREEMENT_MAG = 1e-4


def true_zp(s: CatalogSurvey, sol: UbercalSolution) -> np.ndarray:
    rows = np.searchsorted(s.exposures["expid"], sol.expids)
    zp = s.zp_true[rows][:, sol.quadrants]
    return zp + s.starflat_true[sol.quadrants].mean(axis=(1, 2))[None]


def gauge_rms(a: np.ndarray, b: np.ndarray) -> float:
    d = a - b
    d = d - np.nanmean(d)
    return float(np.sqrt(np.nanmean(d**2)))


def _solve_in_child(path: str, quad: tuple[int, int], options: UbercalOptions) -> dict:
    """Load the observations and solve, in a fresh process: its peak RSS is the
    solve's memory (inputs included)."""
    data = np.load(path)
    obs = ObservationChunk.from_mapping({k: data[k] for k in data.files if k != "ref"})
    ref = np.load(path.replace(".npz", "_ref.npz"))
    refs = ReferenceStars(ref["source_id"], ref["mag"], ref["mag_err"], ref["bp_rp"])
    t0, c0 = time.perf_counter(), time.process_time()
    sol = solve_ubercal(obs, quad_nx=quad[0], quad_ny=quad[1], reference=refs, options=options)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "solution": sol,
    }


def solve_isolated(s: CatalogSurvey, options: UbercalOptions, tmp: Path) -> dict:
    path = tmp / "obs.npz"
    cols = ("expid", "quadrant", "source_id", "x", "y", "mag_inst", "mag_inst_err", "flags")
    np.savez(path, **{k: s.observations[k] for k in cols})
    r = s.reference_stars()
    np.savez(
        str(path).replace(".npz", "_ref.npz"),
        source_id=r.source_id,
        mag=r.mag,
        mag_err=r.mag_err,
        bp_rp=r.bp_rp,
    )
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        quad = (s.config.quad_nx, s.config.quad_ny)
        return pool.submit(_solve_in_child, str(path), quad, options).result()


def large_scale_modes(s: CatalogSurvey, sol: UbercalSolution) -> dict:
    """Zero-point error vs truth: total, averaged per field (the large-scale part)
    and what is left within fields; next to the solution's own errors."""
    d = sol.zp_mag - true_zp(s, sol)
    d -= np.nanmean(d)
    field = s.exposures["field"][np.searchsorted(s.exposures["expid"], sol.expids)]
    per_field = np.array([np.nanmean(d[field == f]) for f in np.unique(field)])
    within = d - per_field[np.searchsorted(np.unique(field), field)][:, None]
    return {
        "zp_rms_vs_truth_mmag": 1e3 * float(np.sqrt(np.nanmean(d**2))),
        "zp_err_median_mmag": 1e3 * float(np.nanmedian(sol.zp_err_mag)),
        "zp_pull_rms": float(np.sqrt(np.nanmean((d / sol.zp_err_mag) ** 2))),
        "per_field_mean_rms_mmag": 1e3 * float(np.sqrt(np.mean(per_field**2))),
        "within_field_rms_mmag": 1e3 * float(np.sqrt(np.nanmean(within**2))),
    }


def design_matrix(s: CatalogSurvey, options: UbercalOptions):
    """The full weighted design matrix of the ubercal model (stars first), with
    the reference prior as extra rows, and the star-mean starting point."""
    chunk = ObservationChunk.from_mapping(s.observations)
    layout = build_layout(
        InMemoryObservations([chunk]),
        quad_nx=s.config.quad_nx,
        quad_ny=s.config.quad_ny,
        reference=s.reference_stars(),
        options=options,
    )
    ix = layout.index(chunk)
    good = ix.valid & (s.observations["flags"] == 0)
    err = s.observations["mag_inst_err"][good]
    sw = 1.0 / np.sqrt(err**2 + options.error_floor_mag**2)
    n = int(good.sum())
    ns = layout.n_star
    g = layout.gradient_start + 2 * ix.exp[good]
    cols = [ix.star[good], ns + ix.zp[good], ns + layout.n_zp + ix.cell[good], ns + g, ns + g + 1]
    vals = [np.ones(n), -np.ones(n), -np.ones(n), -ix.fx[good], -ix.fy[good]]
    rows = [np.arange(n)] * 5
    y = s.observations["mag_inst"][good] * sw
    star_n = np.bincount(ix.star[good], minlength=ns)
    prior = prior_equations(
        layout, star_n, anchor_stars(layout, star_n, np.bincount(ix.star[good], sw**2, ns))
    )
    use = np.flatnonzero(prior.star_w > 0)
    psw = np.sqrt(prior.star_w[use])
    col = layout.ref_bp_rp[use] - options.colour_pivot
    pr = n + np.arange(len(use))
    rows += [pr, pr]
    cols += [use, np.full(len(use), ns + layout.n_param - 1)]
    vals += [np.ones(len(use)), -col]
    J = sp.csr_matrix(
        (
            np.concatenate([v * (sw if i < 5 else psw) for i, v in enumerate(vals)]),
            (np.concatenate(rows), np.concatenate(cols)),
        ),
        shape=(n + len(use), ns + layout.n_param),
    )
    rhs = np.concatenate([y, layout.ref_mag[use] * psw])
    w = sw**2
    x0 = np.zeros(J.shape[1])
    x0[:ns] = np.bincount(ix.star[good], w * s.observations["mag_inst"][good], ns) / np.maximum(
        np.bincount(ix.star[good], w, ns), 1e-300
    )
    return J, rhs, x0, layout


def lsqr_zp(x: np.ndarray, layout) -> np.ndarray:
    """Zero points of an LSQR solution in the solver's gauge (per-quadrant cell
    means moved into the zero points)."""
    ns, nz, nq = layout.n_star, layout.n_zp, layout.n_q
    zp = x[ns : ns + nz].reshape(-1, nq)
    cells = x[ns + nz : ns + nz + layout.n_cell].reshape(nq, -1)
    return zp + cells.mean(axis=1)[None]


def run_lsqr(s: CatalogSurvey, options: UbercalOptions, cap_s: float) -> dict:
    one_pass = options.replace(max_iterations=1, solver="dense")
    chunk = ObservationChunk.from_mapping(s.observations)
    times: dict[bool, float] = {}
    # Best of two: the first call in a process pays for first-touch page faults
    # of its large temporaries (on a fresh VM several times the arithmetic);
    # LSQR, which allocates little and runs several times below, does not.
    for errors in (True, False, True, False):
        t0 = time.perf_counter()
        direct = solve_ubercal(
            chunk,
            quad_nx=s.config.quad_nx,
            quad_ny=s.config.quad_ny,
            reference=s.reference_stars(),
            options=one_pass.replace(compute_errors=errors),
        )
        times[errors] = min(times.get(errors, math.inf), time.perf_counter() - t0)
    J, rhs, x0, layout = design_matrix(s, one_pass)
    out = {
        "n_obs": s.n_obs,
        "n_unknowns": J.shape[1],
        "direct_s": times[True],
        "direct_bare_s": times[False],
    }

    def lsqr(iters: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        res = scipy.sparse.linalg.lsqr(J, rhs, x0=x0, atol=0, btol=0, conlim=0, iter_lim=iters)
        dt = time.perf_counter() - t0
        rms = gauge_rms(lsqr_zp(res[0], layout), direct.zp_mag)
        print(f"    lsqr iter_lim={iters:6d}: {dt:7.1f} s, zp rms vs direct {1e3 * rms:.4f} mmag")
        return dt, rms

    # Double the iteration limit until the agreement is reached (or the cap), then
    # narrow the bracket to 1/8 of it: LSQR is credited with its best time.
    lo, iters = 0, 250
    while True:
        dt, rms = lsqr(iters)
        if rms <= AGREEMENT_MAG or dt > cap_s:
            break
        lo, iters = iters, iters * 2
    best = (iters, dt, rms)
    if rms <= AGREEMENT_MAG:
        hi = iters
        while hi - lo > iters // 8:
            mid = (lo + hi) // 2
            dt, rms = lsqr(mid)
            if rms <= AGREEMENT_MAG:
                hi, best = mid, (mid, dt, rms)
            else:
                lo = mid
    out["lsqr_iterations"], out["lsqr_s"], rms = best
    out["reached"] = rms <= AGREEMENT_MAG
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fields", type=int, nargs=2, default=(5, 5), help="tiling (x, y)")
    ap.add_argument("--visits", type=int, default=6, help="visits per field")
    ap.add_argument("--nights", type=int, default=3)
    ap.add_argument("--lsqr-fields", type=int, nargs=2, default=(4, 4))
    ap.add_argument("--lsqr-density", type=float, default=3000.0, help="stars per quadrant")
    ap.add_argument("--lsqr-cap-s", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip",
        nargs="*",
        default=(),
        choices=("solve", "check", "modes", "lsqr"),
        help="parts to leave out: the 10-million solve (and with it the independent "
        "solve and the run without prior), the independent solve, the run without "
        "prior, LSQR",
    )
    args = ap.parse_args()
    options = UbercalOptions()
    big = CatalogSurveyConfig(
        seed=args.seed,
        n_fields_x=args.fields[0],
        n_fields_y=args.fields[1],
        visits_per_field=args.visits,
        n_nights=args.nights,
    )
    if args.quick:
        big = big.replace(n_fields_x=2, n_fields_y=2, stars_per_quadrant=3000.0)
    if "solve" not in args.skip:
        big_survey(big, options, args.skip)
    if "lsqr" not in args.skip:
        lsqr_side_by_side(args, options)


def big_survey(big: CatalogSurveyConfig, options: UbercalOptions, skip: Sequence[str]) -> None:
    t0 = time.perf_counter()
    s = simulate_catalog_survey(big)
    print(
        f"survey: {s.n_obs:,} observations, {len(s.exposures['expid'])} exposures, "
        f"{len(np.unique(s.observations['source_id'])):,} stars, "
        f"{big.n_fields_x}x{big.n_fields_y} fields x {big.visits_per_field} visits "
        f"({time.perf_counter() - t0:.1f} s to simulate)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = solve_isolated(s, options, Path(tmp))
    sol = run["solution"]
    st = sol.stats
    print(
        f"ubercal solve (outlier passes included): {run['wall_s']:.1f} s wall, "
        f"{run['cpu_s']:.1f} s CPU, "
        f"peak RSS {run['maxrss_gb']:.2f} GB, {st.iterations} passes, "
        f"{st.n_params} unknowns after elimination ({st.solver}), chi2/dof {st.chi2_per_dof:.3f}, "
        f"{st.n_rejected:,} observations and {st.n_rejected_stars:,} stars rejected"
    )
    modes = large_scale_modes(s, sol)
    print(
        "zero points vs truth: rms {zp_rms_vs_truth_mmag:.3f} mmag, own errors median "
        "{zp_err_median_mmag:.3f} mmag, pull rms {zp_pull_rms:.2f}; per-field means rms "
        "{per_field_mean_rms_mmag:.3f} mmag, within fields {within_field_rms_mmag:.3f} mmag".format(
            **modes
        )
    )
    if "check" not in skip:
        independent_check(s, sol, options)
    if "modes" not in skip:
        without_prior(s, options)


def independent_check(s: CatalogSurvey, sol: UbercalSolution, options: UbercalOptions) -> None:
    t0 = time.perf_counter()
    check = solve_ubercal(
        ObservationChunk.from_mapping(s.observations),
        quad_nx=s.config.quad_nx,
        quad_ny=s.config.quad_ny,
        reference=s.reference_stars(),
        options=options.replace(solver="sparse"),
    )
    agree = gauge_rms(sol.zp_mag, check.zp_mag)
    print(
        f"independent solve (sparse LU, {time.perf_counter() - t0:.1f} s): "
        f"zp agreement {1e3 * agree:.2e} mmag rms (target 0.1 mmag)"
    )


def without_prior(s: CatalogSurvey, options: UbercalOptions) -> None:
    rel = solve_ubercal(
        ObservationChunk.from_mapping(s.observations),
        quad_nx=s.config.quad_nx,
        quad_ny=s.config.quad_ny,
        reference=s.reference_stars(),
        options=options.replace(anchor="offset", exposure_gradient=False),
    )
    modes_rel = large_scale_modes(s, rel)
    print(
        "without the reference prior (anchor='offset', no gradient term): rms vs truth "
        "{zp_rms_vs_truth_mmag:.3f} mmag, own errors median {zp_err_median_mmag:.3f} mmag, "
        "pull rms {zp_pull_rms:.2f}, per-field means rms {per_field_mean_rms_mmag:.3f} mmag".format(
            **modes_rel
        )
    )


def lsqr_side_by_side(args: argparse.Namespace, options: UbercalOptions) -> None:
    small = CatalogSurveyConfig(
        seed=args.seed,
        n_fields_x=args.lsqr_fields[0],
        n_fields_y=args.lsqr_fields[1],
        visits_per_field=args.visits,
        n_nights=args.nights,
        stars_per_quadrant=args.lsqr_density,
    )
    if args.quick:
        small = small.replace(stars_per_quadrant=800.0)
    s2 = simulate_catalog_survey(small)
    print(f"LSQR comparison at {s2.n_obs:,} observations (one linear solve, no clipping):")
    cmp = run_lsqr(s2, options, args.lsqr_cap_s)
    status = "reached" if cmp["reached"] else "not reached (cap)"
    bound = "" if cmp["reached"] else " (lower bounds)"
    print(
        f"  direct (Schur + Cholesky): {cmp['direct_s']:.2f} s with errors, "
        f"{cmp['direct_bare_s']:.2f} s without; LSQR: {cmp['lsqr_s']:.1f} s at "
        f"{cmp['lsqr_iterations']} iterations, 0.1 mmag agreement {status}; ratio LSQR/direct = "
        f"{cmp['lsqr_s'] / cmp['direct_s']:.1f}x (with errors), "
        f"{cmp['lsqr_s'] / cmp['direct_bare_s']:.1f}x (without){bound}"
    )


if __name__ == "__main__":
    main()
