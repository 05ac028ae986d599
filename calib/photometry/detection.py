"""Detection of sources matched to the forced positions: an astrometry QA."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning
from photutils.detection import DAOStarFinder
from scipy.spatial import cKDTree

__all__ = ["DetectionQA", "match_detections"]


@dataclass(frozen=True, eq=False)
class DetectionQA:
    """Detection of sources (photutils) matched to the forced positions.

    Attributes
    ----------
    n_detected : int
    match_rate : float
        Fraction of the bright unflagged forced stars (S/N > 20) with a detection
        within ``match_radius_px``.
    dx_median_px, dy_median_px : float
        Median detected - forced position, pixels.
    astrometric_rms_px : float
        Robust rms of the offsets (both axes pooled), pixels.
    n_matched : int
    """

    n_detected: int
    match_rate: float
    dx_median_px: float
    dy_median_px: float
    astrometric_rms_px: float
    n_matched: int


def match_detections(
    fluence: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    snr: np.ndarray,
    *,
    fwhm_px: float,
    noise_e: float,
    threshold_sigma: float = 5.0,
    match_radius_px: float = 1.5,
    min_snr: float = 20.0,
) -> DetectionQA:
    """Detect sources (photutils ``DAOStarFinder``) and match them to forced positions.

    Parameters
    ----------
    fluence : ndarray, shape (ny, nx), e-
        Background-subtracted fluence image.
    x, y : ndarray, shape (n,), pixels
        Forced (catalog) positions.
    snr : ndarray, shape (n,)
        S/N of the forced measurements; with ``min_snr`` selects the stars the
        match rate is computed over (NaN: not counted).
    fwhm_px : float
    noise_e : float
        Per-pixel sky noise, e-.
    threshold_sigma, match_radius_px, min_snr : float

    Returns
    -------
    DetectionQA
    """
    if noise_e <= 0 or fwhm_px <= 0:
        raise ValueError(f"noise_e and fwhm_px must be > 0, got {noise_e} and {fwhm_px}")
    finder = DAOStarFinder(threshold=threshold_sigma * noise_e, fwhm=fwhm_px, exclude_border=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        table = finder(np.asarray(fluence, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        bright = np.asarray(snr) >= min_snr
    if table is None or len(table) == 0 or not bright.any():
        n_det = 0 if table is None else len(table)
        return DetectionQA(n_det, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    det = np.column_stack([np.asarray(table["x_centroid"]), np.asarray(table["y_centroid"])])
    dist, nearest = cKDTree(det).query(np.column_stack([x[bright], y[bright]]))
    hit = dist <= match_radius_px
    dx = det[nearest[hit], 0] - x[bright][hit]
    dy = det[nearest[hit], 1] - y[bright][hit]
    if hit.sum() == 0:
        return DetectionQA(len(table), 0.0, float("nan"), float("nan"), float("nan"), 0)
    _, _, rms = sigma_clipped_stats(np.r_[dx - np.median(dx), dy - np.median(dy)])
    return DetectionQA(
        n_detected=len(table),
        match_rate=float(hit.mean()),
        dx_median_px=float(np.median(dx)),
        dy_median_px=float(np.median(dy)),
        astrometric_rms_px=float(rms),
        n_matched=int(hit.sum()),
    )
