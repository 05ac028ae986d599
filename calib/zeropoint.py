"""Classical zero points: per exposure and quadrant, the sigma-clipped median of
``m_ref + c (colour - pivot) - m_inst`` over the reference stars, with its error.

This is the honest baseline the zero-point network and ubercal are compared with
(BRIEF §7). In the convention of BRIEF §4, ``m = m_inst + zp (+ dzp_starflat)``
and the survey's natural system is ``m = m_ref + c (bp_rp - pivot)``, so a
classical zero point also holds the mean starflat over the stars it used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from astropy.stats import sigma_clip
from scipy.optimize import brentq

from calib.bits import FLAG_CROWDED

__all__ = [
    "ColourTerm",
    "ZeroPoints",
    "classical_zeropoints",
    "extra_scatter",
    "fit_colour_term",
    "median_variance_factor",
    "zeropoint_stars",
]

_MEDIAN_VARIANCE_SAMPLES = 40_000


@functools.lru_cache(maxsize=256)
def median_variance_factor(n: int) -> float:
    """``Var(median of n) / (sigma^2 / n)`` for Gaussian data: 1 for n <= 2,
    1.35 for 3, towards pi/2 for large n (Monte Carlo, fixed seed, ~1 % precise;
    the asymptotic pi/2 over-states small-n errors by up to 16 %)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n <= 2:
        return 1.0
    if n > 200:
        return float(np.pi / 2.0)
    draws = np.random.default_rng(n).standard_normal((_MEDIAN_VARIANCE_SAMPLES, n))
    return float(np.var(np.median(draws, axis=1)) * n)


@dataclass(frozen=True)
class ColourTerm:
    """``m_survey = m_ref + value * (colour - pivot)``.

    Attributes
    ----------
    value : float, mag per mag of colour
    err : float
        Standard error (0 when given, not fitted).
    pivot : float, mag
    n_stars : int
        Stars in the fit after clipping (0 when given).
    fitted : bool
    """

    value: float
    err: float
    pivot: float
    n_stars: int
    fitted: bool


@dataclass(frozen=True, eq=False)
class ZeroPoints:
    """Classical zero points, one per group; arrays of shape (n_groups,).

    Attributes
    ----------
    group : ndarray, int64
        Group ids (e.g. ``expid * 64 + quadrant``), sorted.
    zp : ndarray, float64, mag
        NaN where fewer than ``min_stars`` stars remain.
    zp_err : ndarray, float64, mag
    n_stars : ndarray, int64
        Stars kept after clipping.
    scatter : ndarray, float64, mag
        Clipped standard deviation of the star-by-star zero points.
    colour_term : ColourTerm
    extra_scatter : float, mag
        The scatter added in quadrature to every star's stated error (the
        weighted estimator's :func:`extra_scatter`; NaN for the median).
    """

    group: np.ndarray
    zp: np.ndarray
    zp_err: np.ndarray
    n_stars: np.ndarray
    scatter: np.ndarray
    colour_term: ColourTerm
    extra_scatter: float = float("nan")


def _check_1d(**arrays: np.ndarray) -> int:
    lengths = {name: np.shape(a) for name, a in arrays.items()}
    shapes = set(lengths.values())
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"arrays must be 1-D of one length, got shapes {lengths}")
    return int(next(iter(shapes))[0])


def fit_colour_term(
    delta_mag: np.ndarray,
    colour: np.ndarray,
    group: np.ndarray,
    *,
    delta_err: np.ndarray | None = None,
    pivot: float = 1.0,
    clip_sigma: float = 3.0,
    maxiters: int = 5,
) -> ColourTerm:
    """Fit the colour term common to all groups, with free zero points per group.

    ``delta_mag = m_ref - m_inst = zp(group) - c (colour - pivot)``: a
    fixed-effects regression. Each group's (weighted) means are removed from
    ``delta_mag`` and ``colour`` alike, the slope of the centred values is
    fitted, stars beyond ``clip_sigma`` robust sigmas are dropped, and the means
    are recomputed over the kept stars. (Centring on medians would be wrong: the
    median star of ``delta`` is not the median star of ``colour``, which dilutes
    the slope with a few stars per group.)

    Parameters
    ----------
    delta_mag : ndarray, shape (n,), mag
    colour : ndarray, shape (n,), mag
    group : ndarray, shape (n,), int
    delta_err : ndarray, shape (n,), mag, optional
        Weights ``1 / delta_err^2``; equal weights when omitted.
    pivot : float
    clip_sigma : float
    maxiters : int

    Returns
    -------
    ColourTerm
    """
    _check_1d(delta_mag=delta_mag, colour=colour, group=group)
    delta_mag = np.asarray(delta_mag, dtype=np.float64)
    colour = np.asarray(colour, dtype=np.float64)
    weight = (
        np.ones(len(delta_mag))
        if delta_err is None
        else 1.0 / np.maximum(np.asarray(delta_err, dtype=np.float64), 1e-4) ** 2
    )
    ok = np.isfinite(delta_mag) & np.isfinite(colour) & np.isfinite(weight)
    d, c, w = delta_mag[ok], colour[ok], weight[ok]
    _, g = np.unique(np.asarray(group)[ok], return_inverse=True)
    if len(d) < 3:
        raise ValueError(f"need at least 3 finite stars to fit a colour term, got {len(d)}")
    keep = np.ones(len(d), bool)
    slope, err, n = 0.0, float("nan"), 0
    for _ in range(maxiters + 1):
        wk = np.where(keep, w, 0.0)
        sw = np.bincount(g, weights=wk)
        safe = np.where(sw > 0, sw, 1.0)
        # A group with every star clipped contributes nothing (its centred values
        # are not used: their weight is 0).
        d_mean = np.bincount(g, weights=wk * d) / safe
        c_mean = np.bincount(g, weights=wk * c) / safe
        d_c, c_c = d - d_mean[g], c - c_mean[g]
        sxx = float(np.sum(wk * c_c * c_c))
        if sxx <= 0:
            break
        slope = float(np.sum(wk * c_c * d_c) / sxx)
        resid = (d_c - slope * c_c) * np.sqrt(w)
        n = int(keep.sum())
        per_group = np.bincount(g, weights=keep.astype(float))
        n_groups = int(np.count_nonzero(per_group))
        dof = max(n - n_groups - 1, 1)
        chi2 = float(np.sum(resid[keep] ** 2) / dof)
        err = float(np.sqrt(chi2 / sxx))
        # A star alone in its group is its group's mean: its residual is zero but
        # for rounding, says nothing about the slope or the scatter, and must not
        # set the clipping scale (with mostly single-star groups, rounding noise did).
        paired = per_group[g] >= 2
        if not (keep & paired).any():
            break
        sigma = 1.4826 * float(np.median(np.abs(resid[keep & paired])))
        new = (np.abs(resid) <= clip_sigma * max(sigma, 1e-12)) | (keep & ~paired)
        if np.array_equal(new, keep):
            break
        keep = new
    # delta = zp - c (colour - pivot): the fitted slope is -c.
    return ColourTerm(value=-slope, err=err, pivot=float(pivot), n_stars=n, fitted=True)


def _stated_variance(
    m_inst_err: np.ndarray | None, m_ref_err: np.ndarray | None, n: int, *, nan: float
) -> np.ndarray:
    """Sum of the squared stated errors, shape (n,); a NaN error counts as ``nan``."""
    var = np.zeros(n)
    for e in (m_inst_err, m_ref_err):
        if e is not None:
            if np.shape(e) != (n,):
                raise ValueError(f"errors must have shape {(n,)}, got {np.shape(e)}")
            var = var + np.nan_to_num(np.asarray(e, dtype=np.float64), nan=nan) ** 2
    return var


def _star_variance(
    m_inst_err: np.ndarray | None,
    m_ref_err: np.ndarray | None,
    star_zp: np.ndarray,
    zp: np.ndarray,
    kept_of: dict[int, np.ndarray],
) -> np.ndarray | None:
    """Per-star variance: the stated errors plus the extra scatter all groups share."""
    if m_inst_err is None and m_ref_err is None:
        return None
    var = _stated_variance(m_inst_err, m_ref_err, len(star_zp), nan=0.0)
    if not kept_of:
        return var
    resid2, stated = [], []
    for k, kept in kept_of.items():
        n = len(kept)
        # n / (n - 1) undoes the shrinkage of residuals about a fitted centre.
        resid2.append((star_zp[kept] - zp[k]) ** 2 * n / (n - 1))
        stated.append(var[kept])
    extra = max(0.0, float(np.mean(np.concatenate(resid2)) - np.mean(np.concatenate(stated))))
    return var + extra


def zeropoint_stars(
    flags: np.ndarray,
    contamination: np.ndarray,
    mag_inst_err: np.ndarray,
    *,
    max_contamination: float = 0.01,
    max_mag_err: float = 0.05,
) -> np.ndarray:
    """Measurements a classical zero point may use: no flag but possibly
    ``crowded`` (their estimated contamination below ``max_contamination``: their
    own error is larger), and ``mag_inst_err`` below ``max_mag_err``.

    Parameters
    ----------
    flags : ndarray, shape (n,), int
        :data:`calib.bits.FLAG_BITS`.
    contamination : ndarray, shape (n,)
        Estimated fraction of the aperture flux from neighbours.
    mag_inst_err : ndarray, shape (n,), mag
    max_contamination, max_mag_err : float

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    flags = np.asarray(flags)
    return (
        ((flags & ~FLAG_CROWDED) == 0)
        & (np.asarray(contamination) < max_contamination)
        & (np.asarray(mag_inst_err) < max_mag_err)
    )


def extra_scatter(
    resid: np.ndarray, stated_var: np.ndarray, leverage_var: np.ndarray | None = None
) -> float:
    """The scatter ``e`` [mag] that, added in quadrature to every star's stated
    error, best explains the residuals: the maximum-likelihood ``e`` of
    ``resid ~ N(0, stated_var + e^2 - leverage_var)``, 0 when the stated errors
    already cover them.

    ``leverage_var`` is the variance of the centre each residual is taken
    about (``1 / sum of weights`` of its group's weighted mean): a bright star
    that dominates its group pulls the centre towards itself. Clip outliers
    before calling. Bright stars, whose stated errors are small, say the most
    about ``e``; a median over all stars would hear only the faint ones.
    """
    r2 = np.asarray(resid, dtype=np.float64) ** 2
    v = np.asarray(stated_var, dtype=np.float64)
    h = np.zeros_like(v) if leverage_var is None else np.asarray(leverage_var, dtype=np.float64)
    ok = np.isfinite(r2) & np.isfinite(v) & np.isfinite(h)
    r2, v, h = r2[ok], v[ok], h[ok]
    if len(r2) < 2:
        return 0.0

    def score(e2: float) -> float:
        var = np.maximum(v + e2 - h, 0.05 * (v + e2))
        return float(np.sum((r2 - var) / var**2))

    if score(0.0) <= 0:
        return 0.0
    hi = max(float(np.max(r2)), 1e-12)
    if score(hi) > 0:
        return float(np.sqrt(hi))
    return float(np.sqrt(brentq(score, 0.0, hi, xtol=1e-14)))


def _weighted_means(
    star_zp: np.ndarray,
    var: np.ndarray,
    index: np.ndarray,
    usable: np.ndarray,
    centre: np.ndarray,
    centre_var: np.ndarray,
    *,
    clip_sigma: float,
    maxiters: int,
    min_stars: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clipped inverse-variance weighted mean per group, starting from
    ``centre`` (n_groups,) known to ``centre_var``: a star is kept while it
    lies within ``clip_sigma`` of its own sigma and the centre's. Returns the
    means (NaN with fewer than ``min_stars`` kept), the sums of weights, and
    the kept stars (mask)."""
    n_groups = len(centre)
    w = np.where(usable, 1.0 / np.maximum(var, 1e-12), 0.0)
    s = np.where(usable, star_zp, 0.0)
    keep = usable & (np.abs(s - centre[index]) <= clip_sigma * np.sqrt(var + centre_var[index]))
    for _ in range(maxiters + 1):
        wk = np.where(keep, w, 0.0)
        weight = np.bincount(index, weights=wk, minlength=n_groups)
        safe = np.where(weight > 0, weight, 1.0)
        mean = np.bincount(index, weights=wk * s, minlength=n_groups) / safe
        bound = clip_sigma * np.sqrt(var + 1.0 / safe[index])
        new = usable & (np.abs(s - mean[index]) <= bound)
        if np.array_equal(new, keep):
            break
        keep = new
    n = np.bincount(index, weights=keep.astype(np.float64), minlength=n_groups)
    mean = np.where(n >= min_stars, mean, np.nan)
    return mean, weight, keep & (n[index] >= min_stars)


def _group_medians(values: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the lower median of ``values`` (NaN for an empty group)."""
    order = np.lexsort((values, index))
    counts = np.bincount(index, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = starts + (counts - 1) // 2
    return np.where(counts > 0, values[order][np.minimum(picks, len(values) - 1)], np.nan)


def _weighted_zeropoints(
    star_zp: np.ndarray,
    stated_var: np.ndarray,
    index: np.ndarray,
    usable: np.ndarray,
    n_groups: int,
    *,
    clip_sigma: float,
    maxiters: int,
    min_stars: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Weighted zero points: the extra scatter and the means are found in turn
    (a few rounds settle them). Each group starts from the median of its
    stars, with the median's own uncertainty in the clipping bound: a median
    that counts every star alike can sit among the faint ones, and clipping
    tightly around it would throw the precise stars out; a weighted median
    would follow one bright variable. Returns zp, err, the kept stars and the
    extra scatter [mag]."""
    rows = np.nonzero(usable)[0]
    start = _group_medians(star_zp[rows], index[rows], n_groups)
    deviation = np.abs(star_zp[rows] - start[index[rows]])
    spread = 1.4826 * _group_medians(deviation, index[rows], n_groups)
    counts = np.bincount(index[rows], minlength=n_groups)
    start_var = (1.2533 * spread) ** 2 / np.maximum(counts, 1)
    start, start_var = np.nan_to_num(start), np.nan_to_num(start_var)
    extra2 = 0.01**2
    for _ in range(4):
        zp, weight, keep = _weighted_means(
            star_zp, stated_var + extra2, index, usable, start, start_var,
            clip_sigma=clip_sigma, maxiters=maxiters, min_stars=min_stars,
        )  # fmt: skip
        resid = star_zp[keep] - zp[index[keep]]
        leverage = 1.0 / weight[index[keep]]
        extra2 = extra_scatter(resid, stated_var[keep], leverage) ** 2
    err = np.where(np.isfinite(zp), 1.0 / np.sqrt(np.where(weight > 0, weight, np.nan)), np.nan)
    return zp, err, keep, float(np.sqrt(extra2))


def classical_zeropoints(
    m_inst: np.ndarray,
    m_ref: np.ndarray,
    colour: np.ndarray,
    group: np.ndarray,
    *,
    m_inst_err: np.ndarray | None = None,
    m_ref_err: np.ndarray | None = None,
    colour_term: float | None = None,
    pivot: float = 1.0,
    clip_sigma: float = 3.0,
    maxiters: int = 5,
    min_stars: int = 3,
    min_colour_stars: int = 10,
    estimator: Literal["median", "weighted"] = "median",
) -> ZeroPoints:
    """Sigma-clipped median (or weighted mean) zero point per group, with a colour term.

    Parameters
    ----------
    m_inst : ndarray, shape (n,), mag
        Instrumental magnitudes of clean (unflagged) measurements.
    m_ref : ndarray, shape (n,), mag
        Reference-catalog magnitudes in the same band.
    colour : ndarray, shape (n,), mag
        Reference colour (``bp_rp``).
    group : ndarray, shape (n,), int
        Zero-point group of each measurement (exposure and quadrant).
    m_inst_err, m_ref_err : ndarray, shape (n,), mag, optional
        Per-star errors. When given, a group's error comes from them plus an
        extra scatter common to all groups (starflat, colour residuals),
        estimated from all groups' residuals: with a handful of stars per group
        a sample standard deviation is too noisy an error. Otherwise from the
        group's own clipped scatter.
    colour_term : float, optional
        Fixed colour term; fitted over all groups (:func:`fit_colour_term`) when
        omitted.
    pivot : float
        Colour at which the colour term vanishes.
    clip_sigma : float
        Clipping threshold (in robust standard deviations) around the median.
    maxiters : int
    min_stars : int
        Groups with fewer clipped stars get NaN.
    min_colour_stars : int
        A fitted colour term needs this many stars after clipping; otherwise
        none is applied (``ColourTerm.fitted`` False, value 0, err NaN).
    estimator : {'median', 'weighted'}
        ``'median'``: the clipped median, every star counting the same.
        ``'weighted'`` (needs per-star errors): starting from the median, the
        inverse-variance weighted mean, clipped star by star at ``clip_sigma``
        times each star's own sigma (its stated error and the extra scatter,
        found so that the median chi-square is that of a Gaussian,
        :func:`extra_scatter`). With bright and faint stars together the
        median wastes most of the bright stars' weight (docs/zp_network.md).

    Returns
    -------
    ZeroPoints
        The error is a median's standard error,
        ``sqrt(median_variance_factor(n)) * sigma / sqrt(n)``, ``sigma`` the
        per-star scatter (see ``m_inst_err``), or ``1 / sqrt(sum of weights)``
        for the weighted mean, plus the colour term's error propagated at the
        group's mean colour.
    """
    _check_1d(m_inst=m_inst, m_ref=m_ref, colour=colour, group=group)
    if min_stars < 2:
        raise ValueError(f"min_stars must be >= 2, got {min_stars}")
    if estimator not in ("median", "weighted"):
        raise ValueError(f"estimator must be 'median' or 'weighted', got {estimator!r}")
    if estimator == "weighted" and m_inst_err is None and m_ref_err is None:
        raise ValueError("estimator='weighted' needs per-star errors (m_inst_err or m_ref_err)")
    m_inst = np.asarray(m_inst, dtype=np.float64)
    m_ref = np.asarray(m_ref, dtype=np.float64)
    colour = np.asarray(colour, dtype=np.float64)
    group = np.asarray(group, dtype=np.int64)
    ok = np.isfinite(m_inst) & np.isfinite(m_ref) & np.isfinite(colour)
    if colour_term is None:
        delta_err = None
        if m_inst_err is not None or m_ref_err is not None:
            parts = [
                np.asarray(e, dtype=np.float64)[ok]
                for e in (m_inst_err, m_ref_err)
                if e is not None
            ]
            delta_err = np.sqrt(sum(np.nan_to_num(p) ** 2 for p in parts))
        term = (
            fit_colour_term(
                m_ref[ok] - m_inst[ok],
                colour[ok],
                group[ok],
                delta_err=delta_err,
                pivot=pivot,
                clip_sigma=clip_sigma,
            )
            if ok.sum() >= 3
            else ColourTerm(0.0, float("nan"), float(pivot), 0, fitted=False)
        )
        if term.fitted and (term.n_stars < min_colour_stars or not np.isfinite(term.err)):
            # Too few stars to fit: no colour term rather than a wild one (the
            # ColourTerm says it was not fitted).
            term = ColourTerm(0.0, float("nan"), float(pivot), term.n_stars, fitted=False)
    else:
        term = ColourTerm(float(colour_term), 0.0, float(pivot), 0, fitted=False)
    star_zp = m_ref + term.value * (colour - pivot) - m_inst
    groups = np.unique(group)
    if estimator == "weighted":
        index = np.searchsorted(groups, group)
        stated = _stated_variance(m_inst_err, m_ref_err, len(star_zp), nan=np.inf)
        zp, err, keep, extra = _weighted_zeropoints(
            star_zp, np.where(np.isfinite(stated), stated, 0.0), index,
            ok & np.isfinite(stated), len(groups), clip_sigma=clip_sigma,
            maxiters=maxiters, min_stars=min_stars,
        )  # fmt: skip
        order = np.argsort(index[keep], kind="stable")
        members = np.nonzero(keep)[0][order]
        bounds = np.searchsorted(index[members], np.arange(len(groups) + 1))
        n_kept = np.diff(bounds).astype(np.int64)
        scatter = np.full(len(groups), np.nan)
        for g in np.nonzero(np.isfinite(zp))[0]:
            kept = members[bounds[g] : bounds[g + 1]]
            scatter[g] = float(np.std(star_zp[kept], ddof=1))
            if term.fitted:
                colour_err = term.err * abs(float(np.mean(colour[kept])) - pivot)
                err[g] = float(np.hypot(err[g], colour_err))
        return ZeroPoints(
            group=groups, zp=zp, zp_err=err, n_stars=n_kept, scatter=scatter,
            colour_term=term, extra_scatter=extra,
        )  # fmt: skip
    zp = np.full(len(groups), np.nan)
    err = np.full(len(groups), np.nan)
    scatter = np.full(len(groups), np.nan)
    n_kept = np.zeros(len(groups), dtype=np.int64)
    kept_of: dict[int, np.ndarray] = {}
    for k, gid in enumerate(groups):
        members = np.nonzero(ok & (group == gid))[0]
        n_kept[k] = len(members)
        if len(members) < min_stars:
            continue
        clipped = sigma_clip(
            star_zp[members], sigma=clip_sigma, maxiters=maxiters, cenfunc="median",
            stdfunc="mad_std",
        )  # fmt: skip
        kept = members[~np.ma.getmaskarray(clipped)]
        n_kept[k] = len(kept)
        if len(kept) < min_stars:
            continue
        zp[k] = float(np.median(star_zp[kept]))
        scatter[k] = float(np.std(star_zp[kept], ddof=1))
        kept_of[k] = kept
    star_var = _star_variance(m_inst_err, m_ref_err, star_zp, zp, kept_of)
    for k, kept in kept_of.items():
        colour_err = term.err * abs(float(np.mean(colour[kept])) - pivot) if term.fitted else 0.0
        sigma2 = float(np.mean(star_var[kept])) if star_var is not None else scatter[k] ** 2
        median_err = np.sqrt(median_variance_factor(len(kept)) * sigma2 / len(kept))
        err[k] = float(np.hypot(median_err, colour_err))
    return ZeroPoints(
        group=groups, zp=zp, zp_err=err, n_stars=n_kept, scatter=scatter, colour_term=term
    )
