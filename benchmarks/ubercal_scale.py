"""Ubercal at survey scale: the iterative (matrix-free PCG) solver on a
season-scale survey generated at catalog level (sim.catalogsim) on a ZTF-like
64-quadrant focal plane (4x4 CCDs at ZTF quadrant size), primary and secondary
field grids that overlap (the secondary offset by half a field), dithered
visits over many nights, reference-star density; exposure-quadrant zero points,
10x10 starflat cells on 64 quadrants, per-exposure gradients, outlier passes.

For each size (1 M, 10 M, 100 M observations by default) the whole fit runs in
a fresh process: wall time, peak memory (ru_maxrss, inputs included), outlier
passes, conjugate-gradient iterations (per solve, to show they do not grow with
the footprint), zero points against the truth (gauge offset removed) and the
pull rms on the estimated errors. At the largest size it can finish
(``--cholmod-max-obs``), CHOLMOD (scikit-sparse, as in the LEMAITRE ZTF
starflat code) factorises the same reduced system (one linear solve, no
clipping), next to one iterative solve of the same system: both times, the
ratio and the agreement (target 0.1 mmag). scikit-sparse needs the Debian
package libsuitesparse-dev; without it the peer is skipped with a message.

Run: ``.venv/bin/python benchmarks/ubercal_scale.py [--sizes 1e6 1e7 1e8]``.
The last line is
``ubercal scale: <N_obs> obs, <N_zp> zero points, <wall> s, <peak> GB, pull rms <p>``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from calib.ubercal import InMemoryObservations, ObservationChunk, UbercalOptions, build_layout
from calib.ubercal.gauge import _gauge_pins, anchor_stars, prior_equations
from calib.ubercal.normal import accumulate_normal_equations
from calib.ubercal.priors import parameter_prior
from calib.ubercal.solvers import _inverse_star_weight, _schur
from sim.catalogsim import CatalogSurvey, CatalogSurveyConfig, simulate_catalog_survey

sys.path.insert(0, str(Path(__file__).parent))
from ubercal import gauge_rms, solve_isolated, true_zp

# Reference stars of a season-scale ubercal (bright, S/N > 50): ~110 per quadrant.
STARS_PER_QUADRANT = 3_700.0
MAG_RANGE = (13.0, 17.0)


def survey_config(n_obs: float, seed: int) -> CatalogSurveyConfig:
    """A square footprint sized to ``n_obs`` observations: 20 visits per field
    over 20 nights (the season's cadence per band), primary + secondary grid."""
    per_exposure = 7_000.0  # measured: 64 quadrants x ~110 stars
    visits = 20
    n_exp = n_obs / per_exposure
    fields = n_exp / visits
    # Primary nx*ny plus secondary (nx-1)*(ny-1): ~2 nx^2.
    nx = max(2, round(math.sqrt(fields / 2)))
    return CatalogSurveyConfig(
        seed=seed,
        ccd_cols=(1, 2, 3, 4),
        ccd_rows=(1, 2, 3, 4),
        n_fields_x=nx,
        n_fields_y=nx,
        secondary_grid=True,
        visits_per_field=visits,
        n_nights=visits,
        stars_per_quadrant=STARS_PER_QUADRANT,
        mag_range=MAG_RANGE,
        dither_fraction=0.02,
        field_overlap=0.03,
    )


def accuracy(s: CatalogSurvey, sol) -> dict:
    d = sol.zp_mag - true_zp(s, sol)
    d -= np.nanmean(d)
    pull = d / sol.zp_err_mag
    return {
        "zp_rms_mmag": 1e3 * float(np.sqrt(np.nanmean(d**2))),
        "zp_err_mmag": 1e3 * float(np.nanmedian(sol.zp_err_mag)),
        "pull_rms": float(np.sqrt(np.nanmean(pull**2))),
    }


def cholmod_peer(s: CatalogSurvey, options: UbercalOptions) -> None:
    """CHOLMOD on the formed reduced system vs one iterative solve of it."""
    try:
        from sksparse.cholmod import cholesky
    except ImportError:
        print(
            "CHOLMOD peer skipped: scikit-sparse is not installed (apt-get install "
            "libsuitesparse-dev, then pip install scikit-sparse)"
        )
        return
    one = options.replace(max_iterations=1, compute_errors=False)
    chunk = ObservationChunk.from_mapping(s.observations)
    quad = {"quad_nx": s.config.quad_nx, "quad_ny": s.config.quad_ny}
    ref = s.reference_stars()
    t0 = time.perf_counter()
    layout = build_layout(InMemoryObservations([chunk]), reference=ref, options=one, **quad)
    ne = accumulate_normal_equations(chunk, layout)
    ne = ne + prior_equations(layout, ne.star_n, anchor_stars(layout, ne.star_n, ne.star_w))
    S = _schur(ne, None, None, one.threads)
    P = parameter_prior(layout)
    diag_a, diag_s, diag_p = ne.app.diagonal() + P.diagonal(), S.diagonal(), P.diagonal()
    active = (diag_a > 0) & (diag_s + diag_p > 1e-9 * diag_a)
    free = active & ~_gauge_pins(layout, active, diag_s + diag_p)
    fi = np.flatnonzero(free)
    b = ne.bp - ne.aps @ (ne.star_b * _inverse_star_weight(ne.star_w))
    x = cholesky((S + P)[fi][:, fi].tocsc())(b[fi])
    t_chol = time.perf_counter() - t0
    zp_chol = np.zeros(layout.n_param)
    zp_chol[fi] = x
    from calib.ubercal import solve_ubercal

    t0 = time.perf_counter()
    it = solve_ubercal(chunk, reference=ref, options=one.replace(solver="iterative"), **quad)
    t_it = time.perf_counter() - t0
    zp_c = zp_chol[: layout.n_zp].reshape(it.zp_mag.shape)
    agree = gauge_rms(zp_c, it.zp_mag)
    print(
        f"CHOLMOD at {s.n_obs:,} obs ({len(fi):,} unknowns, nnz(S) {S.nnz:,}): "
        f"{t_chol:.1f} s (Schur complement formed + factorised); iterative one solve "
        f"{t_it:.1f} s; ratio CHOLMOD/iterative {t_chol / t_it:.2f}; zero points agree to "
        f"{1e3 * agree:.4f} mmag rms (target 0.1)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=(1e6, 1e7, 1e8))
    ap.add_argument("--cholmod-max-obs", type=float, default=1.1e6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    options = UbercalOptions(
        zp_mode="exposure_quadrant", cells=(10, 10), solver="iterative", error_samples=32
    )
    rows = []
    last = None
    for n in args.sizes:
        cfg = survey_config(n, args.seed)
        t0 = time.perf_counter()
        s = simulate_catalog_survey(cfg)
        n_exp = len(s.exposures["expid"])
        print(
            f"survey: {s.n_obs:,} observations, {n_exp:,} exposures, "
            f"{len(np.unique(s.observations['source_id'])):,} stars, "
            f"{cfg.n_fields_x}x{cfg.n_fields_y} + {(cfg.n_fields_x - 1) ** 2} fields x "
            f"{cfg.visits_per_field} visits ({time.perf_counter() - t0:.0f} s to simulate)",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            run = solve_isolated(s, options, Path(tmp))
        sol = run["solution"]
        st = sol.stats
        acc = accuracy(s, sol)
        solves = max(st.iterations - 1, 1)
        row = {
            "n_obs": s.n_obs,
            "n_zp": int(np.isfinite(sol.zp_mag).sum()),
            "wall_s": run["wall_s"],
            "cpu_s": run["cpu_s"],
            "peak_gb": run["maxrss_gb"],
            "passes": st.iterations,
            "cg_per_solve": st.cg_iterations / solves,
            **acc,
        }
        rows.append(row)
        print(row, flush=True)
        if s.n_obs <= args.cholmod_max_obs:
            cholmod_peer(s, options)
        last = row
        del s, sol, run
    print()
    print(
        "| obs | zero points | wall s | CPU s | peak GB | passes | CG it./solve (incl. errors) "
        "| zp rms vs truth mmag | median zp err mmag | pull rms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n_obs']:,} | {r['n_zp']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['peak_gb']:.2f} | {r['passes']} | {r['cg_per_solve']:.0f} | "
            f"{r['zp_rms_mmag']:.3f} | {r['zp_err_mmag']:.3f} | {r['pull_rms']:.2f} |"
        )
    assert last is not None
    print(
        f"ubercal scale: {last['n_obs']} obs, {last['n_zp']} zero points, "
        f"{last['wall_s']:.0f} s, {last['peak_gb']:.1f} GB, pull rms {last['pull_rms']:.2f}"
    )


if __name__ == "__main__":
    main()
