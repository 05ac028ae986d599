"""The public solve: outlier passes around the solver, the solution in the final
gauge with its errors and QA; the standalone starflat fit."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from calib.starflat import Starflat
from calib.ubercal.covariance import _parameter_variances
from calib.ubercal.errors import UbercalError
from calib.ubercal.gauge import _anchor, _gauge_transform, anchor_stars, prior_equations
from calib.ubercal.iterative import IterativeResult, solve_iterative
from calib.ubercal.layout import UbercalLayout, build_layout
from calib.ubercal.normal import NormalEquations, _prepare
from calib.ubercal.observations import (
    InMemoryObservations,
    ObservationChunk,
    ObservationSource,
    ReferenceStars,
    _lookup,
)
from calib.ubercal.options import UbercalOptions
from calib.ubercal.outliers import (
    _PassState,
    _PassStatistics,
    _rejected_stars,
    _require_usable,
    _run_pass,
)
from calib.ubercal.priors import parameter_prior, prior_rows
from calib.ubercal.qa import FitStatistics, UbercalQA, _qa
from calib.ubercal.sizing import ModelSizing
from calib.ubercal.solvers import _Parameters, _solve, _Solved


@dataclass(frozen=True)
class UbercalSolution:
    """Result of :func:`solve_ubercal`.

    Attributes
    ----------
    expids : ndarray, shape (n_exp,), int64
    quadrants : ndarray, shape (n_q,), int64
    zp_mag, zp_err_mag : ndarray, shape (n_exp, n_q), mag
        Zero points (``m = m_inst + zp + dzp``) and their relative errors (the mean
        zero point held fixed); NaN where unconstrained. Per-exposure zero points
        repeat along quadrants.
    source_ids : ndarray, shape (n_star,), int64
    star_mag, star_mag_err : ndarray, shape (n_star,), mag
        Calibrated magnitudes (natural system, anchored) and errors; NaN for
        rejected or unconstrained stars.
    star_n_obs : ndarray, shape (n_star,), int64
        Observations used per star.
    star_rms_mag : ndarray, shape (n_star,), mag
        Repeatability: rms of the star's residuals (NaN with < 2 observations).
    star_rejected : ndarray, shape (n_star,), bool
        Rejected as variable.
    starflat : Starflat or None
    colour_term, colour_term_err : ndarray, shape (n_q,) or None
        Per-quadrant colour coefficient [mag per mag of bp_rp].
    stats : FitStatistics
    qa : UbercalQA
    options : UbercalOptions
        As fitted (``zp_mode`` and ``cells`` settled).
    gradient_mag, gradient_err_mag : ndarray, shape (n_exp, 2), mag, or None
        Per-exposure gradient coefficients ``(g_x, g_y)`` and errors.
    gradient_prior_dominated : ndarray of bool, shape (n_exp,), or None
        Exposures whose gradient the data constrain less than its prior.
    sizing : ModelSizing or None
        How the zero-point granularity and the starflat grid were chosen.
    """

    expids: np.ndarray
    quadrants: np.ndarray
    zp_mag: np.ndarray
    zp_err_mag: np.ndarray
    source_ids: np.ndarray
    star_mag: np.ndarray
    star_mag_err: np.ndarray
    star_n_obs: np.ndarray
    star_rms_mag: np.ndarray
    star_rejected: np.ndarray
    starflat: Starflat | None
    colour_term: np.ndarray | None
    colour_term_err: np.ndarray | None
    stats: FitStatistics
    qa: UbercalQA
    options: UbercalOptions
    gradient_mag: np.ndarray | None = None
    gradient_err_mag: np.ndarray | None = None
    gradient_prior_dominated: np.ndarray | None = None
    sizing: ModelSizing | None = None

    def calibrate(self, chunk: ObservationChunk, *, bp_rp: np.ndarray | None = None) -> np.ndarray:
        """Calibrated magnitudes ``m_inst + zp + dzp (+ k (bp_rp - pivot))`` of
        observations, shape (n,), mag; NaN for unknown exposures or quadrants."""
        e = _lookup(self.expids, chunk.expid)
        q = _lookup(self.quadrants, chunk.quadrant)
        ok = (e >= 0) & (q >= 0)
        m = np.where(ok, chunk.mag_inst + self.zp_mag[np.maximum(e, 0), np.maximum(q, 0)], np.nan)
        if self.starflat is not None:
            m[ok] += self.starflat.evaluate(chunk.quadrant[ok], chunk.x[ok], chunk.y[ok])
        if self.colour_term is not None and bp_rp is not None:
            m[ok] += self.colour_term[q[ok]] * (bp_rp[ok] - self.options.colour_pivot)
        return m


def solve_ubercal(
    observations: ObservationChunk | ObservationSource,
    *,
    quad_nx: int,
    quad_ny: int,
    reference: ReferenceStars | None = None,
    options: UbercalOptions | None = None,
) -> UbercalSolution:
    """Fit zero points, starflat, colour terms and star magnitudes globally.

    Parameters
    ----------
    observations : ObservationChunk or ObservationSource
        One in-memory table (split into ``options.chunk_size`` chunks) or a source
        that maps a function over its chunks wherever they live (e.g. Dask).
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size.
    reference : ReferenceStars, optional
        Reference magnitudes of the band: the anchor of the global gauge (and the
        colours of the colour term). Without it the mean zero point is zero.
    options : UbercalOptions, optional

    Returns
    -------
    UbercalSolution

    Raises
    ------
    DisconnectedGraphError
        If groups of exposures share no star.
    UbercalError
        If the system is otherwise singular, or no reference star is usable.
    """
    opt = options or UbercalOptions()
    if isinstance(observations, ObservationChunk):
        source: ObservationSource = InMemoryObservations(observations.split(opt.chunk_size))
    elif hasattr(observations, "map_reduce"):
        source = observations
    else:
        raise TypeError(
            "observations must be an ObservationChunk or have a map_reduce method, "
            f"got {type(observations).__name__}"
        )
    layout = build_layout(
        source, quad_nx=quad_nx, quad_ny=quad_ny, reference=reference, options=opt
    )
    lay_opt = layout.options
    if lay_opt.solver == "iterative" or (
        lay_opt.solver == "auto" and layout.n_param > lay_opt.dense_max_params
    ):
        return _finish_iterative(solve_iterative(source, layout), layout)
    if isinstance(source, InMemoryObservations):
        # Index once: every outlier pass reuses the mapped identifiers and weights.
        source = InMemoryObservations([_prepare(c, layout) for c in source.chunks])
    return _iterate(source, layout)


def _finish_iterative(res: IterativeResult, layout: UbercalLayout) -> UbercalSolution:
    """The solution of the iterative path (the same steps as :func:`_finish`)."""
    opt = layout.options
    p = res.p.copy()
    star_mag = res.star_mag.copy()
    if opt.colour_term:
        shift = p[layout.colour_slice] - res.p_solve[layout.colour_slice]
        star_mag += np.nanmean(shift) * layout.colour
    star_mag = np.where(res.star_rejected, np.nan, star_mag)
    if layout.n_anchor:
        offset, offset_err, n_anchor = 0.0, res.mean_zp_err, res.n_anchor
        chi2_prior = res.chi2_prior
    else:
        offset, offset_err, n_anchor = _anchor(layout, star_mag, res.star_n, res.star_weight)
        chi2_prior = 0.0
    p[: layout.n_zp] += offset
    star_mag += offset
    w = res.star_weight
    inv_d = np.divide(1.0, w, out=np.full_like(w, np.nan), where=w > 0)
    star_err = np.sqrt(inv_d + res.star_var_p)
    fit_stats = _fit_statistics(
        layout,
        {**res.stats.counts, "cg_iterations": sum(res.cg_iterations)},
        chi2_prior=chi2_prior + _parameter_prior_chi2(layout, res.p_solve),
        n_anchor=n_anchor,
        n_star_fitted=int(np.count_nonzero(w > 0)),
        n_free=res.n_free,
        n_rejected_stars=int(res.star_rejected.sum()),
        passes=res.passes,
        converged=res.converged,
        method=res.method,
        offset=(offset, offset_err),
    )
    fit_stats = dataclasses.replace(fit_stats, cg_iterations_per_solve=res.cg_iterations)
    return _assemble(
        layout,
        p=p,
        p_var=res.p_var,
        flags=res.flags,
        star_mag=star_mag,
        star_mag_err=np.where(np.isfinite(star_mag), star_err, np.nan),
        star_n_obs=res.star_nobs,
        star_rms=res.star_rms,
        star_rejected=res.star_rejected,
        stats=fit_stats,
        qa=_qa(res.stats, layout, star_mag, res.star_rms),
    )


def _iterate(source: ObservationSource, layout: UbercalLayout) -> UbercalSolution:
    opt = layout.options
    rejected = before = np.zeros(layout.n_star, dtype=bool)
    current: _Parameters | None = None
    previous: _Parameters | None = None
    solved: _Solved | None = None
    ne: NormalEquations | None = None  # the data's equations and the prior's
    prior_ne: NormalEquations | None = None
    anchor = np.zeros(layout.n_star, dtype=bool)
    converged = False
    passes = 0
    while True:
        final = passes + 1 > opt.max_iterations
        state = _PassState(current, previous, rejected, before, final=final)
        result = source.map_reduce(functools.partial(_run_pass, layout=layout, state=state))
        passes += 1
        stats = result.stats
        newly = np.zeros_like(rejected)
        if solved is not None:
            newly = _rejected_stars(stats, opt.star_clip_sigma) & ~rejected
            changed = stats.counts["n_changed"]
            if not newly.any() and changed <= opt.clip_tolerance * stats.counts["n_good"]:
                if changed and result.delta is not None:
                    # A handful of observations flip across the threshold and back
                    # at every pass: stable. Solve once more to match the selection.
                    ne, prior_ne, change = _updated(ne, prior_ne, result.delta, layout, anchor)
                    solved = _solve(ne, layout, prior_ne, prior=solved, changed=change)
                converged = True
                break
        if final:
            break
        delta = cast(NormalEquations, result.delta)
        if ne is None:
            _require_usable(stats.counts)
            # The anchor stars are chosen once, from all usable observations: a
            # set that followed the clipping would feed back into it (a star at
            # the error threshold moving in and out at every pass).
            anchor = anchor_stars(layout, delta.star_n, delta.star_w)
            if layout.n_anchor:
                prior_ne = prior_equations(layout, delta.star_n, anchor)
                ne = delta + prior_ne
            else:
                ne = delta
            solved = _solve(ne, layout, prior_ne)
        else:
            ne, prior_ne, change = _updated(ne, prior_ne, delta, layout, anchor)
            solved = _solve(ne, layout, prior_ne, prior=solved, changed=change)
        previous, current = current, solved.params
        before, rejected = rejected, rejected | newly
    if solved is None:
        raise UbercalError("max_iterations left no pass to solve")
    return _finish(stats, solved, layout, rejected, passes, converged)


def _updated(
    ne: NormalEquations | None,
    prior_ne: NormalEquations | None,
    delta: NormalEquations,
    layout: UbercalLayout,
    anchor: np.ndarray,
) -> tuple[NormalEquations, NormalEquations | None, NormalEquations]:
    """The equations after a pass's change ``delta``: (total, prior, change). The
    prior follows the stars that lost or regained all their observations, so only
    small pieces are added before the one sum with the (large) total."""
    total = cast(NormalEquations, ne)
    change = delta
    if prior_ne is not None:
        new_prior = prior_equations(layout, total.star_n + delta.star_n, anchor)
        change = delta + (new_prior - prior_ne)
        prior_ne = new_prior
    touched = np.flatnonzero(np.diff(change.aps.indptr) > 0)
    return (total + change).pruned(touched), prior_ne, change


def _finish(
    stats: _PassStatistics,
    solved: _Solved,
    layout: UbercalLayout,
    rejected: np.ndarray,
    passes: int,
    converged: bool,
) -> UbercalSolution:
    opt = layout.options
    ne = solved.ne
    active = solved.active
    p = _gauge_transform(solved.params.p, layout, active, centre_zp=False)
    star_mag = solved.params.star_mag.copy()
    nz = layout.n_zp
    if opt.colour_term:
        # Moving the mean colour term into the star magnitudes keeps every model value.
        shift = p[layout.colour_slice] - solved.params.p[layout.colour_slice]
        star_mag += np.nanmean(shift) * layout.colour
    star_mag = np.where(rejected, np.nan, star_mag)
    if opt.compute_errors:
        p_var, star_var_p, mean_zp_err = _parameter_variances(solved, layout)
    else:
        p_var = np.full(layout.n_param, np.nan)
        star_var_p = np.full(layout.n_star, np.nan)
        mean_zp_err = math.nan
    chi2_prior = 0.0
    if layout.n_anchor:
        offset, offset_err = 0.0, mean_zp_err
        prior = cast(NormalEquations, solved.prior_ne)
        use = prior.star_w > 0
        n_anchor = int(np.count_nonzero(use))
        a = solved.params.p[-1] * (layout.ref_bp_rp[use] - opt.colour_pivot)
        r_ref = solved.params.star_mag[use] - layout.ref_mag[use] - a
        chi2_prior = float(np.nansum(prior.star_w[use] * r_ref**2))
    else:
        offset, offset_err, n_anchor = _anchor(layout, star_mag, ne.star_n, ne.star_w)
    p[:nz] += offset
    star_mag += offset

    inv_d = np.divide(1.0, ne.star_w, out=np.full_like(ne.star_w, np.nan), where=ne.star_w > 0)
    star_err = np.sqrt(inv_d + star_var_p)

    nobs = stats.star_nobs
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.maximum(nobs, 1)
        rms = np.sqrt(
            np.maximum(stats.star_r2 - stats.star_r1**2 / n, 0.0) / np.maximum(nobs - 1, 1)
        )
        rms = np.where(nobs >= 2, rms, np.nan)
    fit_stats = _fit_statistics(
        layout,
        stats.counts,
        chi2_prior=chi2_prior + _parameter_prior_chi2(layout, solved.params.p),
        n_anchor=n_anchor,
        n_star_fitted=int(np.count_nonzero(ne.star_w > 0)),
        n_free=solved.n_free,
        n_rejected_stars=int(rejected.sum()),
        passes=passes,
        converged=converged,
        method=solved.method,
        offset=(offset, offset_err),
    )
    return _assemble(
        layout,
        p=p,
        p_var=p_var,
        flags=solved.prior_dominated,
        star_mag=star_mag,
        star_mag_err=np.where(np.isfinite(star_mag), star_err, np.nan),
        star_n_obs=nobs,
        star_rms=rms,
        star_rejected=rejected,
        stats=fit_stats,
        qa=_qa(stats, layout, star_mag, rms),
    )


def _parameter_prior_chi2(layout: UbercalLayout, p: np.ndarray) -> float:
    """``p^T P p`` of the parameter priors (centred on zero)."""
    P = parameter_prior(layout)
    if not P.nnz:
        return 0.0
    x = np.nan_to_num(p)
    return float(x @ (P @ x))


def _fit_statistics(
    layout: UbercalLayout,
    counts: dict[str, float],
    *,
    chi2_prior: float,
    n_anchor: int,
    n_star_fitted: int,
    n_free: int,
    n_rejected_stars: int,
    passes: int,
    converged: bool,
    method: str,
    offset: tuple[float, float],
) -> FitStatistics:
    c = counts
    # The reference prior's equations and the parameter priors count as observations.
    dof = int(
        c["n_used"] + n_anchor * layout.n_anchor + prior_rows(layout) - n_star_fitted - n_free
    )
    chi2 = float(c["chi2"]) + chi2_prior
    return FitStatistics(
        chi2=chi2,
        dof=dof,
        chi2_per_dof=chi2 / dof if dof > 0 else math.nan,
        n_obs=int(c["n_obs"]),
        n_good=int(c["n_good"]),
        n_used=int(c["n_used"]),
        n_rejected=int(c["n_good"] - c["n_used"]),
        n_clipped=int(c["n_clipped"]),
        n_rejected_stars=n_rejected_stars,
        iterations=passes,
        converged=converged,
        solver=method,
        n_params=n_free,
        anchor_offset_mag=float(offset[0]),
        anchor_offset_err_mag=float(offset[1]),
        n_anchor_stars=int(n_anchor),
        cg_iterations=int(c.get("cg_iterations", 0)),
    )


def _assemble(
    layout: UbercalLayout,
    *,
    p: np.ndarray,
    p_var: np.ndarray,
    flags: np.ndarray,
    star_mag: np.ndarray,
    star_mag_err: np.ndarray,
    star_n_obs: np.ndarray,
    star_rms: np.ndarray,
    star_rejected: np.ndarray,
    stats: FitStatistics,
    qa: UbercalQA,
) -> UbercalSolution:
    """The solution from parameters in the final gauge (``p``, ``p_var``, the
    prior-dominated ``flags``, all (n_param,)) and the per-star results."""
    opt = layout.options
    nz, nc = layout.n_zp, layout.n_cell
    n_exp, nq = len(layout.expids), layout.n_q
    err = np.sqrt(p_var)
    if opt.zp_mode == "exposure_quadrant":
        zp = p[:nz].reshape(n_exp, nq)
        zp_err = err[:nz].reshape(n_exp, nq)
    else:
        zp = np.repeat(p[:nz, None], nq, axis=1)
        zp_err = np.repeat(err[:nz, None], nq, axis=1)
    starflat = None
    if opt.starflat:
        shape = (nq, *opt.grid)
        starflat = Starflat(
            quadrants=layout.quadrants,
            dzp_mag=p[nz : nz + nc].reshape(shape),
            dzp_err_mag=err[nz : nz + nc].reshape(shape),
            quad_nx=layout.quad_nx,
            quad_ny=layout.quad_ny,
            gauge="quadrant" if opt.zp_mode == "exposure_quadrant" else "focal_plane",
            prior_dominated=flags[nz : nz + nc].reshape(shape),
        )
    colour, colour_err = (
        (p[layout.colour_slice], err[layout.colour_slice]) if opt.colour_term else (None, None)
    )
    gradient = gradient_err = None
    gradient_flags_arr: np.ndarray | None = None
    if opt.exposure_gradient:
        g = slice(layout.gradient_start, layout.gradient_start + layout.n_gradient)
        gradient, gradient_err = p[g].reshape(n_exp, 2), err[g].reshape(n_exp, 2)
        gradient_flags_arr = np.asarray(flags[g].reshape(n_exp, 2).any(axis=1))
    return UbercalSolution(
        expids=layout.expids,
        quadrants=layout.quadrants,
        zp_mag=zp,
        zp_err_mag=zp_err,
        source_ids=layout.source_ids,
        star_mag=star_mag,
        star_mag_err=star_mag_err,
        star_n_obs=star_n_obs,
        star_rms_mag=star_rms,
        star_rejected=star_rejected,
        starflat=starflat,
        colour_term=colour,
        colour_term_err=colour_err,
        stats=stats,
        qa=qa,
        options=opt,
        gradient_mag=gradient,
        gradient_err_mag=gradient_err,
        gradient_prior_dominated=gradient_flags_arr,
        sizing=layout.sizing,
    )


def fit_starflat(
    observations: ObservationChunk,
    *,
    quad_nx: int,
    quad_ny: int,
    reference: ReferenceStars | None = None,
    options: UbercalOptions | None = None,
) -> Starflat:
    """Fit a starflat on a dithered sequence of exposures (seed 004's procedure).

    The same stars, observed on different cells by dithering, fix the relative
    response of the cells: this is the ubercal fit with star magnitudes, one zero
    point per exposure (by default; a photometric night) and the starflat, with
    outlier rejection.

    A dithered sequence does not constrain the linear gradient of the field across
    the focal plane: it trades exactly against a sky gradient of the star
    magnitudes plus a per-exposure zero point, and only the variation within cells
    tells them apart. The reference catalog, when given, fixes it (it enters as a
    prior on the star magnitudes, ``UbercalOptions.anchor``); without it the
    gradient is poorly determined, and its errors say so.

    Parameters
    ----------
    observations : ObservationChunk
        The sequence's catalogs (expid, quadrant, source_id, x, y, mag_inst, ...).
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size.
    reference : ReferenceStars, optional
        Reference magnitudes (recommended: they fix the field's gradient).
    options : UbercalOptions, optional
        Solver options; ``starflat`` is forced on. Default: per-exposure zero
        points, 10x10 cells, no per-exposure gradient (without a reference catalog
        its mean over exposures would be left to the variation within cells).

    Returns
    -------
    Starflat
    """
    opts = options or UbercalOptions(zp_mode="exposure", exposure_gradient=False)
    if not opts.starflat:
        opts = opts.replace(starflat=True)
    solution = solve_ubercal(
        observations, quad_nx=quad_nx, quad_ny=quad_ny, reference=reference, options=opts
    )
    if solution.starflat is None:
        raise RuntimeError("solve_ubercal returned no starflat although starflat=True")
    return solution.starflat
