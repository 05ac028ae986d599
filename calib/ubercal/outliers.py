"""Outlier passes: residuals under a solution, the selection of observations
(clipping) and of stars (variables), and the change of the normal equations
from one pass to the next."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from calib.ubercal.errors import UbercalError
from calib.ubercal.layout import UbercalLayout
from calib.ubercal.normal import NormalEquations, _normal_equations, _prepare, _Prepared
from calib.ubercal.observations import ObservationChunk
from calib.ubercal.qa import _QA_HIST_BINS, _QA_HIST_HALF_RANGE_MAG, _QA_MAX_ERR_MAG
from calib.ubercal.solvers import _Parameters


@dataclass(frozen=True)
class _PassState:
    """What a pass needs to rebuild the previous pass's selection and make its own."""

    current: _Parameters | None
    previous: _Parameters | None
    star_rejected: np.ndarray  # (n_star,) bool, for this pass
    star_rejected_before: np.ndarray  # (n_star,) bool, as the previous pass had it
    # The last pass the iteration allows: no solve follows, so the change of the
    # normal equations is not needed (statistics only).
    final: bool = False


@dataclass(frozen=True)
class _PassStatistics:
    """Residual statistics of a pass: per star over its usable observations
    (clipped ones included: ``star_*_all``, for the variability test) and over the
    used ones (repeatability), plus QA histograms. Sums, except ``star_max*``
    (the observation with the largest ``w r^2``: the one a star may lose)."""

    star_w_all: np.ndarray  # (n_star,) sum w
    star_wr_all: np.ndarray  # (n_star,) sum w r
    star_chi2_all: np.ndarray  # (n_star,) sum w r^2
    star_n_all: np.ndarray  # (n_star,) count
    star_max: np.ndarray  # (n_star,) largest w r^2
    star_max_w: np.ndarray  # (n_star,) w of that observation
    star_max_wr: np.ndarray  # (n_star,) w r of that observation
    star_r1: np.ndarray  # (n_star,) sum r over used observations
    star_r2: np.ndarray  # (n_star,) sum r^2 over used observations
    star_nobs: np.ndarray  # (n_star,) observations used
    qa_hist: np.ndarray  # (n_q * qa_ny * qa_nx, n_bins) residual histograms
    counts: dict[str, float]

    def __add__(self, other: _PassStatistics) -> _PassStatistics:
        summed = {f: getattr(self, f) + getattr(other, f) for f in _STAT_SUMS}
        theirs = other.star_max > self.star_max
        return _PassStatistics(
            **summed,
            star_max=np.where(theirs, other.star_max, self.star_max),
            star_max_w=np.where(theirs, other.star_max_w, self.star_max_w),
            star_max_wr=np.where(theirs, other.star_max_wr, self.star_max_wr),
            counts={k: self.counts[k] + other.counts[k] for k in self.counts},
        )


_STAT_SUMS = (
    "star_w_all",
    "star_wr_all",
    "star_chi2_all",
    "star_n_all",
    "star_r1",
    "star_r2",
    "star_nobs",
    "qa_hist",
)


@dataclass(frozen=True)
class _PassResult:
    """One pass over a chunk: the change of the normal equations since the
    previous pass's selection, and the statistics of this pass's selection."""

    delta: NormalEquations | None  # None in a final pass
    stats: _PassStatistics

    def __add__(self, other: _PassResult) -> _PassResult:
        delta = None if self.delta is None or other.delta is None else self.delta + other.delta
        return _PassResult(delta, self.stats + other.stats)


def _model_residual(params: _Parameters, prep: _Prepared, layout: UbercalLayout) -> np.ndarray:
    """``m_inst - (m_s - zp - dzp - k colour)`` (NaN for unusable observations)."""
    ix = prep.ix
    s = np.where(prep.good, ix.star, 0)
    pred = params.star_mag[s] - params.p[np.where(prep.good, ix.zp, 0)]
    if layout.options.starflat:
        pred -= params.p[layout.n_zp + np.where(prep.good, ix.cell, 0)]
    if layout.options.colour_term:
        colour_p = params.p[layout.n_zp + layout.n_cell + np.where(prep.good, ix.iq, 0)]
        pred -= colour_p * layout.colour[s]
    if layout.options.exposure_gradient:
        g = layout.gradient_start + 2 * np.where(prep.good, ix.exp, 0)
        pred -= params.p[g] * ix.fx + params.p[g + 1] * ix.fy
    return np.where(prep.good, prep.mag - pred, np.nan)


def _selected(
    prep: _Prepared,
    layout: UbercalLayout,
    params: _Parameters | None,
    rejected: np.ndarray,
    residual: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(used, clipped, residual) under a solution and a set of rejected stars;
    ``residual`` when the caller has computed it already."""
    star_ok = ~rejected[np.where(prep.good, prep.ix.star, 0)]
    if params is None:
        n = len(prep.w)
        return prep.good & star_ok, np.zeros(n, dtype=bool), np.full(n, np.nan)
    r = _model_residual(params, prep, layout) if residual is None else residual
    # The solution does not say which observations it was fitted on, so both
    # normalisations are formed. Fitted, a residual's variance is sigma^2 (1 - h),
    # h = w / W_star its leverage on the star magnitude (without it, stars with 2-3
    # observations would never clip); left out, sigma^2 (1 + h). The second is
    # the smaller |z|, and an observation whose left-out |z| exceeds the threshold
    # is clipped whichever it was. In the band between the two only the star's
    # worst observation (in this chunk) goes: one cosmic-ray hit drags the mean
    # of a few observations far enough to put the good ones past 5 sigma, and
    # clipping them all at once left a star with one observation that the next
    # pass (h = 1) put back, a cycle. Left out, an observation's z equals the one
    # it had when fitted, so what is clipped stays clipped.
    star = np.where(prep.good, prep.ix.star, 0)
    lev = prep.w / np.maximum(params.star_weight[star], 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_in = np.abs(r) * np.sqrt(prep.w / np.clip(1.0 - lev, 1e-3, None))
        z_out = np.abs(r) * np.sqrt(prep.w / (1.0 + lev))
    clip = layout.options.clip_sigma
    cand = prep.good & star_ok & np.isfinite(z_in)
    worst = np.zeros(layout.n_star)
    np.maximum.at(worst, star[cand], z_in[cand])
    # No residual (star or parameter left unsolved by the last clipping): stay out,
    # or the observation would flip back in and out at every pass.
    # Ties within rounding count as the worst: a star's two fitted observations
    # always have the same |z|, and which one is bad cannot be told.
    is_worst = z_in >= worst[star] * (1.0 - 1e-6)
    clipped = prep.good & star_ok & (~(z_out <= clip) | ((z_in > clip) & is_worst))
    return prep.good & star_ok & ~clipped, clipped, r


def _run_pass(
    chunk: ObservationChunk | _Prepared, layout: UbercalLayout, state: _PassState
) -> _PassResult:
    """One pass over a chunk: select observations under ``state.current`` and
    return the change from the previous pass's selection (rebuilt from
    ``state.previous``, so chunks keep no state between passes)."""
    prep = _prepare(chunk, layout)
    used, clipped, r = _selected(prep, layout, state.current, state.star_rejected)
    remembered = prep.last_used.pop((id(state.previous), id(state.star_rejected_before)), None)
    prep.last_used[(id(state.current), id(state.star_rejected))] = used
    delta: NormalEquations | None = None
    if state.current is None:
        delta = _normal_equations(prep, layout, np.flatnonzero(used))
        changed = 0
    else:
        before = remembered
        if before is None:
            before, _, _ = _selected(prep, layout, state.previous, state.star_rejected_before)
        if not state.final:
            added = _normal_equations(prep, layout, np.flatnonzero(used & ~before))
            removed = _normal_equations(prep, layout, np.flatnonzero(before & ~used))
            delta = added - removed
        changed = int(np.count_nonzero(used != before))
    stats = _statistics(
        prep, layout, used, clipped, r, changed=changed, solved=state.current is not None
    )
    return _PassResult(delta, stats)


def _statistics(
    prep: _Prepared,
    layout: UbercalLayout,
    used: np.ndarray,
    clipped: np.ndarray,
    r: np.ndarray,
    *,
    changed: int,
    solved: bool,
) -> _PassStatistics:
    """Statistics of a selection (``used``, ``clipped``; residuals ``r`` under
    the solution it was made with, when ``solved``)."""
    opt = layout.options
    ns = layout.n_star
    k = np.flatnonzero(used)
    s, wk = prep.ix.star[k], prep.w[k]
    nqa = layout.n_q * opt.qa_cells[0] * opt.qa_cells[1]
    zeros = np.zeros(ns)
    stats = _PassStatistics(
        star_w_all=zeros,
        star_wr_all=zeros,
        star_chi2_all=zeros,
        star_n_all=np.zeros(ns, dtype=np.int64),
        star_max=zeros,
        star_max_w=zeros,
        star_max_wr=zeros,
        star_r1=zeros,
        star_r2=zeros,
        star_nobs=np.bincount(s, minlength=ns).astype(np.int64),
        qa_hist=np.zeros((nqa, _QA_HIST_BINS), dtype=np.int64),
        counts={
            "n_obs": float(prep.n_obs),
            "n_good": float(np.count_nonzero(prep.good)),
            "n_used": float(len(k)),
            "n_clipped": float(np.count_nonzero(clipped)),
            "n_changed": float(changed),
            "chi2": 0.0,
        },
    )
    if solved:
        rk = r[k]
        width = 2 * _QA_HIST_HALF_RANGE_MAG / _QA_HIST_BINS
        sel = np.flatnonzero(wk > _QA_MAX_ERR_MAG**-2)
        b = np.floor((rk[sel] + _QA_HIST_HALF_RANGE_MAG) / width).astype(np.int64)
        b = np.clip(b, 0, _QA_HIST_BINS - 1)
        hist = np.bincount(prep.ix.qa[k][sel] * _QA_HIST_BINS + b, minlength=nqa * _QA_HIST_BINS)
        a = np.flatnonzero((used | clipped) & np.isfinite(r))
        sa, wa, ra = prep.ix.star[a], prep.w[a], r[a]
        chi = wa * ra * ra
        star_max = np.zeros(ns)
        np.maximum.at(star_max, sa, chi)
        # The observation that holds its star's maximum (the first one, on a tie).
        at_max = np.flatnonzero(chi == star_max[sa])
        first = at_max[np.unique(sa[at_max], return_index=True)[1]]
        stats = dataclasses.replace(
            stats,
            star_w_all=np.bincount(sa, weights=wa, minlength=ns),
            star_wr_all=np.bincount(sa, weights=wa * ra, minlength=ns),
            star_chi2_all=np.bincount(sa, weights=wa * ra * ra, minlength=ns),
            star_n_all=np.bincount(sa, minlength=ns).astype(np.int64),
            star_max=star_max,
            star_max_w=np.bincount(sa[first], weights=wa[first], minlength=ns),
            star_max_wr=np.bincount(sa[first], weights=wa[first] * ra[first], minlength=ns),
            star_r1=np.bincount(s, weights=rk, minlength=ns),
            star_r2=np.bincount(s, weights=rk * rk, minlength=ns),
            qa_hist=hist.reshape(nqa, _QA_HIST_BINS),
            counts={**stats.counts, "chi2": float(np.sum(wk * rk * rk))},
        )
    return stats


def _rejected_stars(stats: _PassStatistics, sigma: float) -> np.ndarray:
    """Variable stars: the chi2 of their usable observations but the worst about
    those observations' weighted mean is ``sigma`` above its expectation
    (Wilson-Hilferty normal equivalent, n - 2 degrees of freedom).

    Clipped observations count, or a variable star would lose its extreme points
    to the clipping and pass; the worst one (largest ``w r^2``) is left out of the
    sums *and of the mean*, so that one cosmic-ray hit does not cost its star
    (removing only its own term would leave the mean it dragged, and with five
    observations that alone exceeds 5 sigma). Centring on the mean makes the test
    independent of the star magnitude of the solution the pass used.
    """
    s0 = stats.star_w_all - stats.star_max_w
    s1 = stats.star_wr_all - stats.star_max_wr
    chi2 = stats.star_chi2_all - stats.star_max - s1**2 / np.where(s0 > 0, s0, 1.0)
    dof = stats.star_n_all - 2
    ok = dof >= 1
    k = np.where(ok, dof, 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.cbrt(np.maximum(chi2, 0.0) / k) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))
    return ok & (z > sigma)


def _require_usable(counts: dict[str, float]) -> None:
    """Refuse a first pass that found nothing to fit (every observation flagged,
    non-finite or without a positive error)."""
    if not counts["n_good"]:
        raise UbercalError(
            f"observations: none of the {int(counts['n_obs']):,} is usable (flags 0, finite "
            "mag_inst and a positive mag_inst_err are needed)"
        )
