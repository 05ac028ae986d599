"""Ubercal at survey scale: the iterative (matrix-free PCG) solver on a
season-scale survey generated at catalog level (sim.catalogsim) on a ZTF-like
64-quadrant focal plane (4x4 CCDs at ZTF quadrant size), primary and secondary
field grids that overlap (the secondary offset by half a field), dithered
visits over 20 nights, reference-star density; exposure-quadrant zero points,
10x10 starflat cells on 64 quadrants, per-exposure gradients, outlier passes.

The survey is generated exposure by exposure (``CatalogSurveyPlan``) into
compact columns (int32 exposure ids, int16 quadrants, float32 positions and
magnitudes, uint8 flags: 31 bytes per observation) handed to the fit as
chunks of ~2 M observations, so that 100 M observations fit beside the fit
(whose star-complete partitions hold ~100 bytes per observation).

For each size (1 M, 10 M, 100 M observations by default; the footprint is a
whole number of fields, so ``--sizes 1e8`` makes about 95 M observations and
974,080 zero points, and the default 1.1e8 about 105 M and 1,076,480, the
issue's "at least 1 million") the whole fit runs in a fresh process that
generates the survey itself: wall and CPU time of the fit,
peak memory of the process (ru_maxrss, the generated survey included), outlier
passes, conjugate-gradient iterations per solve (the error estimate's last),
zero points against the truth (gauge offset removed) and the pull rms on the
estimated errors.

``--compare`` times one linear solve (first pass, no clipping, no errors) per
preconditioner at each size: the iteration counts against the footprint.
At sizes up to ``--cholmod-max-obs``, CHOLMOD (scikit-sparse, the solver of
the LEMAITRE ZTF starflat code) factorises the same reduced system formed
explicitly, next to one iterative solve of it: both times, the ratio and the
agreement of the zero points (target 0.1 mmag). scikit-sparse needs the Debian
package libsuitesparse-dev; Debian 12's SuiteSparse 5 builds scikit-sparse
< 0.5. Without it the peer is skipped with a message.

Run: ``.venv/bin/python benchmarks/ubercal_scale.py [--sizes 1e6 1e7 1.1e8]``.
The last line is
``ubercal scale: <N_obs> obs, <N_zp> zero points, <wall> s, <peak> GB, pull rms <p>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import operator
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar, cast

import numpy as np

from calib.ubercal import (
    InMemoryObservations,
    ObservationChunk,
    UbercalOptions,
    build_layout,
    solve_ubercal,
)
from calib.ubercal.iterative import InMemoryPartitions, partition_in_memory
from sim.catalogsim import CatalogSurveyConfig, CatalogSurveyPlan, plan_catalog_survey

T = TypeVar("T")

# Bright reference stars of a season-scale ubercal (13 < m < 17, S/N > 50).
STARS_PER_QUADRANT = 3_300.0
MAG_RANGE = (13.0, 17.0)
OBS_PER_EXPOSURE = 6_250.0  # measured at this density: 64 quadrants x ~98 stars
VISITS = 20

_COMPACT = {
    "expid": np.int32,
    "quadrant": np.int16,
    "source_id": np.int64,
    "x": np.float32,
    "y": np.float32,
    "mag_inst": np.float32,
    "mag_inst_err": np.float32,
    "flags": np.uint8,
}


def survey_config(n_obs: float, seed: int) -> CatalogSurveyConfig:
    """A square footprint sized to ``n_obs`` observations: 20 visits per field
    over 20 nights (a season's cadence per band), a primary grid of nx x nx
    fields and the secondary grid's (nx-1) x (nx-1) between them."""
    fields = n_obs / OBS_PER_EXPOSURE / VISITS
    nx = max(2, round((1 + math.sqrt(max(2 * fields - 1, 1))) / 2))
    return CatalogSurveyConfig(
        seed=seed,
        ccd_cols=(1, 2, 3, 4),
        ccd_rows=(1, 2, 3, 4),
        n_fields_x=nx,
        n_fields_y=nx,
        secondary_grid=True,
        visits_per_field=VISITS,
        n_nights=VISITS,
        stars_per_quadrant=STARS_PER_QUADRANT,
        mag_range=MAG_RANGE,
        dither_fraction=0.02,
        field_overlap=0.03,
    )


class GeneratedObservations:
    """An ObservationSource over a survey generated once, exposure by exposure,
    kept in compact columns and handed out in chunks of ``chunk_obs``."""

    def __init__(self, plan: CatalogSurveyPlan, chunk_obs: int = 2_000_000) -> None:
        self.hand_over = False
        self.chunks: list[ObservationChunk] = []
        pending: list[dict[str, np.ndarray]] = []
        n = 0
        for e in range(plan.n_exposures):
            cat = plan.exposure_catalog(e)
            pending.append({k: cat[k].astype(t) for k, t in _COMPACT.items()})
            n += len(cat["expid"])
            if n >= chunk_obs or e == plan.n_exposures - 1:
                self.chunks.append(
                    ObservationChunk(
                        **{k: np.concatenate([p[k] for p in pending]) for k in _COMPACT}
                    )
                )
                pending, n = [], 0

    @property
    def n_obs(self) -> int:
        return sum(len(c) for c in self.chunks)

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T:
        return functools.reduce(operator.add, (fn(c) for c in self.chunks))

    def partition(
        self, key: Callable[[ObservationChunk], np.ndarray], n_parts: int, build: Callable
    ) -> InMemoryPartitions:
        """The iterative solver's regrouping. With ``hand_over`` set (the last
        fit of this source) it takes the chunks over: each is let go once split,
        so the observations are not held twice (as the stage's Dask source keeps
        them where they were read), and the source is then empty."""
        if not self.hand_over:
            return partition_in_memory(self, key, n_parts, build)
        chunks, self.chunks = self.chunks, []
        return partition_in_memory(_Consumed(chunks), key, n_parts, build)


@dataclasses.dataclass
class _Consumed:
    """Chunks handed to one ``map_reduce``, each dropped once ``fn`` has seen it."""

    chunks: list[ObservationChunk]

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T:
        total = None
        while self.chunks:
            y = fn(self.chunks.pop(0))
            total = y if total is None else total + y
        return cast(T, total)


def zp_accuracy(
    plan: CatalogSurveyPlan,
    expids: np.ndarray,
    quadrants: np.ndarray,
    zp_mag: np.ndarray,
    zp_err_mag: np.ndarray,
) -> dict[str, float]:
    """Zero points (n_exp, n_q) against the truth (quadrant mean of the true
    starflat moved into them, as the solution's gauge does), the global offset
    removed."""
    rows = np.searchsorted(plan.exposures["expid"], expids)
    truth = plan.zp_true[rows][:, quadrants]
    truth = truth + plan.starflat_true[quadrants].mean(axis=(1, 2))[None]
    d = zp_mag - truth
    d -= np.nanmean(d)
    pull = d / zp_err_mag
    return {
        "zp_rms_mmag": 1e3 * float(np.sqrt(np.nanmean(d**2))),
        "zp_err_mmag": 1e3 * float(np.nanmedian(zp_err_mag)),
        "pull_rms": float(np.sqrt(np.nanmean(pull**2))),
    }


def _usage() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _fit_in_child(
    n_obs: float, seed: int, options: UbercalOptions, compare: list[str], fit: bool
) -> dict:
    """Generate the survey and fit it, in a fresh process (its peak RSS is the
    benchmark's memory)."""
    t0 = time.perf_counter()
    plan = plan_catalog_survey(survey_config(n_obs, seed))
    source = GeneratedObservations(plan)
    quad = {"quad_nx": plan.config.quad_nx, "quad_ny": plan.config.quad_ny}
    ref = plan.reference_stars()
    out: dict[str, Any] = {
        "n_obs": source.n_obs,
        "n_exp": plan.n_exposures,
        "n_fields": f"{plan.config.n_fields_x}^2+{(plan.config.n_fields_x - 1) ** 2}",
        "generate_s": time.perf_counter() - t0,
        "solves": {},
    }
    for prec in compare:
        one = options.replace(max_iterations=1, compute_errors=False, preconditioner=prec)
        w0, c0 = _usage()
        sol = solve_ubercal(source, reference=ref, options=one, **quad)
        w1, c1 = _usage()
        out["solves"][prec] = {
            "iterations": sol.stats.cg_iterations,
            "wall_s": w1 - w0,
            "cpu_s": c1 - c0,
            "zp": sol.zp_mag,
        }
        print(
            f"  {source.n_obs:,} obs, {prec}: {sol.stats.cg_iterations} iterations, "
            f"{w1 - w0:.0f} s wall, {c1 - c0:.0f} s CPU; {load()}",
            flush=True,
        )
    if fit:
        source.hand_over = True
        # The direct path indexes in-memory chunks once for all its passes.
        fitted: Any = InMemoryObservations(source.chunks) if options.solver == "dense" else source
        w0, c0 = _usage()
        sol = solve_ubercal(fitted, reference=ref, options=options, **quad)
        w1, c1 = _usage()
        st = sol.stats
        out.update(
            {
                "n_zp": int(np.isfinite(sol.zp_mag).sum()),
                "wall_s": w1 - w0,
                "cpu_s": c1 - c0,
                "passes": st.iterations,
                "cg": st.cg_iterations_per_solve,
                "chi2_per_dof": st.chi2_per_dof,
                **zp_accuracy(plan, sol.expids, sol.quadrants, sol.zp_mag, sol.zp_err_mag),
                "zp": sol.zp_mag,
            }
        )
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    first = None
    for v in out["solves"].values():
        first = v["zp"] if first is None else first
        v["zp_rms_vs_first_mmag"] = 1e3 * _gauge_rms(v.pop("zp"), first)
    return out


def _gauge_rms(a: np.ndarray, b: np.ndarray) -> float:
    d = a - b
    d = d - np.nanmean(d)
    return float(np.sqrt(np.nanmean(d**2)))


def _in_child(fn: Callable[..., T], *args: Any) -> T:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _cholmod_in_child(n_obs: float, seed: int, options: UbercalOptions) -> dict | str:
    """CHOLMOD on the formed reduced system vs one iterative solve of it."""
    try:
        from sksparse.cholmod import cholesky
    except ImportError:
        return (
            "CHOLMOD peer skipped: scikit-sparse is not installed (apt-get install "
            "libsuitesparse-dev, then pip install 'scikit-sparse<0.5' on Debian 12)"
        )
    from calib.ubercal.gauge import _gauge_pins, anchor_stars, prior_equations
    from calib.ubercal.normal import accumulate_normal_equations
    from calib.ubercal.priors import parameter_prior
    from calib.ubercal.solvers import _inverse_star_weight, _schur

    plan = plan_catalog_survey(survey_config(n_obs, seed))
    source = GeneratedObservations(plan)
    quad = {"quad_nx": plan.config.quad_nx, "quad_ny": plan.config.quad_ny}
    ref = plan.reference_stars()
    one = options.replace(max_iterations=1, compute_errors=False)
    w0, c0 = _usage()
    layout = build_layout(source, reference=ref, options=one, **quad)
    ne = source.map_reduce(functools.partial(accumulate_normal_equations, layout=layout))
    ne = ne + prior_equations(layout, ne.star_n, anchor_stars(layout, ne.star_n, ne.star_w))
    S = _schur(ne, None, None, one.threads)
    P = parameter_prior(layout)
    diag_a, diag_s, diag_p = ne.app.diagonal() + P.diagonal(), S.diagonal(), P.diagonal()
    active = (diag_a > 0) & (diag_s + diag_p > 1e-9 * diag_a)
    free = active & ~_gauge_pins(layout, active, diag_s + diag_p)
    fi = np.flatnonzero(free)
    b = ne.bp - ne.aps @ (ne.star_b * _inverse_star_weight(ne.star_w))
    A = (S + P)[fi][:, fi].tocsc()
    nnz = A.nnz
    del S, ne
    w2, c2 = _usage()
    factor = cholesky(A)
    x = factor(b[fi])
    w3, c3 = _usage()
    p = np.zeros(layout.n_param)
    p[fi] = x
    fill = factor.L().nnz
    del factor, A
    w4, c4 = _usage()
    it = solve_ubercal(source, reference=ref, options=one.replace(solver="iterative"), **quad)
    w5, c5 = _usage()
    zp_c = p[: layout.n_zp].reshape(it.zp_mag.shape)
    return {
        "n_obs": source.n_obs,
        "unknowns": len(fi),
        "nnz": nnz,
        "factor_nnz": fill,
        "form_s": w2 - w0,
        "factor_s": w3 - w2,
        "iterative_s": w5 - w4,
        "form_cpu_s": c2 - c0,
        "factor_cpu_s": c3 - c2,
        "iterative_cpu_s": c5 - c4,
        "iterations": it.stats.cg_iterations,
        "agree_mmag": 1e3 * _gauge_rms(zp_c, it.zp_mag),
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def _dense_beside(n: float, seed: int, options: UbercalOptions, row: dict, zp: np.ndarray) -> None:
    """The whole fit by the direct path next to the iterative one at one size."""
    dense = options.replace(solver="dense", dense_max_params=10**9)
    try:
        d = _in_child(_fit_in_child, n, seed, dense, [], True)
    except BrokenProcessPool:
        print(f"dense at {n:g} obs: the process died (killed, most likely for memory)")
        return
    print(
        f"dense Cholesky, whole fit at {d['n_obs']:,} obs: {d['wall_s']:.0f} s wall, "
        f"{d['cpu_s']:.0f} s CPU, peak {d['peak_gb']:.2f} GB, {d['passes']} passes, zp rms vs "
        f"truth {d['zp_rms_mmag']:.3f} mmag, pull rms {d['pull_rms']:.2f}; iterative "
        f"{row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU: ratio dense/iterative "
        f"{d['wall_s'] / row['wall_s']:.2f} wall, {d['cpu_s'] / row['cpu_s']:.2f} CPU; zero "
        f"points agree to {1e3 * _gauge_rms(d['zp'], zp):.4f} mmag rms; {load()}",
        flush=True,
    )


def load() -> str:
    """The load average, to print next to every timing (the machine is shared)."""
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=(1e6, 1e7, 1.1e8))
    ap.add_argument(
        "--compare",
        nargs="*",
        default=(),
        choices=("block_jacobi", "jacobi", "two_level", "two_level_exposures"),
        help="time one linear solve per preconditioner at each size (iteration counts)",
    )
    ap.add_argument("--no-fit", action="store_true", help="only the --compare solves")
    ap.add_argument("--preconditioner", default="two_level_exposures")
    ap.add_argument("--cg-tolerance", type=float, default=1e-7)
    ap.add_argument("--error-samples", type=int, default=16)
    ap.add_argument("--cholmod-max-obs", type=float, default=1.1e6)
    ap.add_argument(
        "--dense-max-obs",
        type=float,
        default=0.0,
        help="at sizes up to this, also the whole fit by the direct path (formed Schur "
        "complement, dense Cholesky, exact errors) in a fresh process: where 'auto' should "
        "switch (dense_max_params)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    options = UbercalOptions(
        zp_mode="exposure_quadrant",
        cells=(10, 10),
        solver="iterative",
        preconditioner=args.preconditioner,
        cg_tolerance=args.cg_tolerance,
        error_samples=args.error_samples,
    )
    print(
        f"options: preconditioner {options.preconditioner}, cg_tolerance {options.cg_tolerance:g}, "
        f"error_samples {options.error_samples}, "
        f"error_cg_tolerance {options.error_cg_tolerance:g}, "
        f"partition_obs {options.partition_obs:,}, threads {options.threads}; {load()}",
        flush=True,
    )
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        try:
            row = _in_child(
                _fit_in_child, n, args.seed, options, list(args.compare), not args.no_fit
            )
        except BrokenProcessPool:
            # Killed (the kernel's OOM killer, most often): the sizes that finished
            # still make the table and the summary line.
            print(
                f"{n:g} obs: the fitting process died after {time.perf_counter() - t0:.0f} s "
                f"(killed, most likely for memory); {load()}",
                flush=True,
            )
            continue
        row["load"] = load()
        zp = row.pop("zp", None)
        rows.append(row)
        print(row, flush=True)
        if zp is not None and n <= args.dense_max_obs:
            _dense_beside(n, args.seed, options, row, zp)
        if n <= args.cholmod_max_obs:
            try:
                peer = _in_child(_cholmod_in_child, n, args.seed, options)
            except BrokenProcessPool:
                peer = f"CHOLMOD at {n:g} obs: the process died (killed, most likely for memory)"
            if isinstance(peer, str):
                print(peer)
            else:
                print(
                    f"CHOLMOD at {peer['n_obs']:,} obs ({peer['unknowns']:,} unknowns, nnz(S) "
                    f"{peer['nnz']:,}, factor {peer['factor_nnz']:,}): reduced system formed "
                    f"{peer['form_s']:.1f} s ({peer['form_cpu_s']:.1f} s CPU) + factorised and "
                    f"solved {peer['factor_s']:.1f} s ({peer['factor_cpu_s']:.1f} s CPU); "
                    f"iterative one solve {peer['iterative_s']:.1f} s "
                    f"({peer['iterative_cpu_s']:.1f} s CPU, {peer['iterations']} iterations); "
                    "ratio CHOLMOD/iterative "
                    f"{(peer['form_s'] + peer['factor_s']) / peer['iterative_s']:.2f} wall, "
                    f"{(peer['form_cpu_s'] + peer['factor_cpu_s']) / peer['iterative_cpu_s']:.2f}"
                    f" CPU (factor alone {peer['factor_cpu_s'] / peer['iterative_cpu_s']:.2f} CPU)"
                    f"; zero points agree to "
                    f"{peer['agree_mmag']:.5f} mmag rms (target 0.1); peak {peer['peak_gb']:.1f} "
                    f"GB; {load()}",
                    flush=True,
                )
    if args.compare:
        print()
        print(
            "| obs | exposures | fields | "
            + " | ".join(f"{p} it. (s)" for p in args.compare)
            + " |"
        )
        print("|---|---|---|" + "---|" * len(args.compare))
        for r in rows:
            cells = [
                f"{r['solves'][p]['iterations']} ({r['solves'][p]['wall_s']:.0f})"
                for p in args.compare
            ]
            print(
                f"| {r['n_obs']:,} | {r['n_exp']:,} | {r['n_fields']} | " + " | ".join(cells) + " |"
            )
    fits = [r for r in rows if "wall_s" in r]
    if not fits:
        return
    print()
    print(
        "| obs | zero points | wall s | CPU s | peak GB | passes | CG it. per solve (errors last) "
        "| zp rms vs truth mmag | median zp err mmag | pull rms | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in fits:
        print(
            f"| {r['n_obs']:,} | {r['n_zp']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['peak_gb']:.2f} | {r['passes']} | {', '.join(map(str, r['cg']))} | "
            f"{r['zp_rms_mmag']:.3f} | {r['zp_err_mmag']:.3f} | {r['pull_rms']:.2f} | {r['load']} |"
        )
    last = fits[-1]
    print(
        f"ubercal scale: {last['n_obs']} obs, {last['n_zp']} zero points, "
        f"{last['wall_s']:.0f} s, {last['peak_gb']:.1f} GB, pull rms {last['pull_rms']:.2f}"
    )


if __name__ == "__main__":
    main()
