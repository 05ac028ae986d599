"""QA of a solution: fit statistics, median residual maps (from additive
histograms) and repeatability per magnitude bin."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from calib.ubercal.layout import UbercalLayout

if TYPE_CHECKING:
    from calib.ubercal.outliers import _PassStatistics


_QA_HIST_HALF_RANGE_MAG = 0.1


_QA_HIST_BINS = 400


_QA_MAX_ERR_MAG = 0.05


_REPEATABILITY_BINS_MAG = np.arange(12.0, 22.01, 0.5)


@dataclass(frozen=True)
class FitStatistics:
    """Fit statistics of an ubercal solution.

    Attributes
    ----------
    chi2, dof, chi2_per_dof : float
        Over the observations used in the final solution and, with the
        reference prior, its equations.
    n_obs, n_good, n_used : int
        Observations given, usable (flags 0, finite, known ids), used.
    n_rejected : int
        Usable observations not used: clipped or of rejected stars.
    n_clipped, n_rejected_stars : int
    iterations : int
        Passes over the observations.
    converged : bool
        The clipped set stopped changing before ``max_iterations``.
    solver : str
        ``'dense-cholesky'`` or ``'sparse-lu'``.
    n_params : int
        Unknowns of the reduced system (after gauge pins).
    anchor_offset_mag, anchor_offset_err_mag : float, mag
        Shift applied to tie the relative solution to the reference catalog and
        its error (``anchor='offset'``); with the prior, 0 and the error of the
        mean zero point.
    n_anchor_stars : int
    cg_iterations : int
        Conjugate-gradient iterations over all passes (iterative solver; 0 else).
    cg_iterations_per_solve : tuple of int
        The same per solve, in order; the error estimate's solve last.
    """

    chi2: float
    dof: int
    chi2_per_dof: float
    n_obs: int
    n_good: int
    n_used: int
    n_rejected: int
    n_clipped: int
    n_rejected_stars: int
    iterations: int
    converged: bool
    solver: str
    n_params: int
    anchor_offset_mag: float
    anchor_offset_err_mag: float
    n_anchor_stars: int
    cg_iterations: int = 0
    cg_iterations_per_solve: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class UbercalQA:
    """Quality numbers and maps of a solution.

    Attributes
    ----------
    residual_median_mag : ndarray, shape (n_q, qa_ny, qa_nx), mag
        Median residual (data - model) of well-measured observations per map pixel
        of each quadrant (the slides' "median residuals"); NaN where empty.
    repeatability_mag_bins : ndarray, shape (n_bins + 1,), mag
        Star magnitude bin edges.
    repeatability_median_mag : ndarray, shape (n_bins,), mag
        Median over stars of the rms of their residuals, per magnitude bin.
    repeatability_n_stars : ndarray, shape (n_bins,), int
    """

    residual_median_mag: np.ndarray
    repeatability_mag_bins: np.ndarray
    repeatability_median_mag: np.ndarray
    repeatability_n_stars: np.ndarray


def _qa(
    stats: _PassStatistics, layout: UbercalLayout, star_mag: np.ndarray, rms: np.ndarray
) -> UbercalQA:
    hist = stats.qa_hist
    width = 2 * _QA_HIST_HALF_RANGE_MAG / _QA_HIST_BINS
    cum = np.cumsum(hist, axis=1)
    tot = cum[:, -1]
    half = tot / 2.0
    j = np.argmax(cum >= half[:, None], axis=1)
    below = np.where(j > 0, cum[np.arange(len(j)), np.maximum(j - 1, 0)], 0)
    inbin = np.maximum(hist[np.arange(len(j)), j], 1)
    med = -_QA_HIST_HALF_RANGE_MAG + width * (j + (half - below) / inbin)
    med = np.where(tot > 0, med, np.nan).reshape(layout.n_q, *layout.options.qa_cells)
    bins = _REPEATABILITY_BINS_MAG
    which = np.digitize(star_mag, bins) - 1
    ok = np.isfinite(rms) & np.isfinite(star_mag) & (which >= 0) & (which < len(bins) - 1)
    medians = np.full(len(bins) - 1, np.nan)
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    for b in np.unique(which[ok]):
        sel = ok & (which == b)
        medians[b] = np.median(rms[sel])
        counts[b] = sel.sum()
    return UbercalQA(
        residual_median_mag=med,
        repeatability_mag_bins=bins,
        repeatability_median_mag=medians,
        repeatability_n_stars=counts,
    )
