"""Aperture corrections: large over working aperture, per quadrant, pooled per
exposure where a quadrant has too few stars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from calib.photometry.apertures import aperture_sums

__all__ = ["ApertureCorrection", "apply_aperture_corrections"]


@dataclass(frozen=True, eq=False)
class ApertureCorrection:
    """Multiplicative aperture correction, large over working aperture.

    Attributes
    ----------
    value : float
        ``flux(r_big) / flux(r_ap)``: clipped median over the stars; NaN when no
        star qualified.
    err : float
        Its standard error.
    n_stars : int
        Stars used (after clipping).
    source : str
        ``'quadrant'`` (its own stars) or ``'exposure'`` (pooled fallback).
    ratios, ratio_errs : ndarray, shape (n_candidates,)
        The candidate stars' ratios and errors, for pooling.
    """

    value: float
    err: float
    n_stars: int
    source: str = "quadrant"
    ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ratio_errs: np.ndarray = field(default_factory=lambda: np.zeros(0))


def measure_aperture_correction(
    fluence: np.ndarray,
    variance: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    flux: np.ndarray,
    sel: np.ndarray,
    r_ap: float,
    r_big: float,
) -> ApertureCorrection:
    if len(sel) == 0:
        return ApertureCorrection(value=float("nan"), err=float("nan"), n_stars=0)
    big, big_var = aperture_sums(fluence, px[sel], py[sel], r_big, variance=variance)
    _, ap_var = aperture_sums(fluence, px[sel], py[sel], r_ap, variance=variance)
    ratio = big / flux[sel]
    # Only the annulus between the apertures is noise in the ratio.
    ratio_err = np.sqrt(np.maximum(big_var - ap_var, 0.0)) / flux[sel]
    return _robust_ratio(ratio, ratio_err, source="quadrant")


def _robust_ratio(
    ratios: np.ndarray, errors: np.ndarray, *, source: str, clip: float = 3.0
) -> ApertureCorrection:
    """Weighted mean after clipping around the weighted median: an undetected
    neighbour in the big aperture only ever adds light, so the tail is one-sided
    and must not pull the centre the clipping starts from."""
    ok = np.isfinite(ratios) & np.isfinite(errors) & (errors > 0)
    values, errs = ratios[ok], errors[ok]
    if len(values) == 0:
        return ApertureCorrection(float("nan"), float("nan"), 0, source, ratios, errors)
    w = 1.0 / errs**2
    order = np.argsort(values)
    cum = np.cumsum(w[order])
    centre = float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])
    keep = np.abs(values - centre) <= clip * errs
    if not keep.any():
        keep = np.ones(len(values), bool)
    mean = float(np.sum(w[keep] * values[keep]) / np.sum(w[keep]))
    err = float(1.0 / np.sqrt(np.sum(w[keep])))
    n = int(keep.sum())
    if n >= 3:
        # The formal error is a floor: the scatter may say it is larger.
        chi2 = float(np.sum(w[keep] * (values[keep] - mean) ** 2) / (n - 1))
        err *= max(1.0, np.sqrt(chi2))
    return ApertureCorrection(mean, err, n, source, ratios, errors)


def apply_aperture_corrections(
    corrections: Sequence[ApertureCorrection], *, min_stars: int = 10
) -> list[ApertureCorrection]:
    """Corrections to apply per quadrant of one exposure.

    A quadrant with at least ``min_stars`` correction stars keeps its own value;
    the others take the clipped mean of all the exposure's correction stars
    pooled (the PSF is an exposure property to first order); with fewer than 3
    of those, 1 with zero error (no correction).

    Parameters
    ----------
    corrections : sequence of ApertureCorrection
        One per quadrant, from :func:`photometer_quadrant`.
    min_stars : int

    Returns
    -------
    list of ApertureCorrection
    """
    if min_stars < 1:
        raise ValueError(f"min_stars must be >= 1, got {min_stars}")
    ratios = np.concatenate([np.zeros(0), *(c.ratios for c in corrections)])
    errs = np.concatenate([np.zeros(0), *(c.ratio_errs for c in corrections)])
    pooled = _robust_ratio(ratios, errs, source="exposure")
    if pooled.n_stars < 3:
        # Two stars cannot outvote a contaminated one: no correction at all.
        pooled = ApertureCorrection(value=1.0, err=0.0, n_stars=0, source="exposure")
    return [c if c.n_stars >= min_stars and np.isfinite(c.value) else pooled for c in corrections]
