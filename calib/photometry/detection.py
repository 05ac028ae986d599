"""Detection of sources matched to the forced positions: an astrometry QA.

photutils' ``DAOStarFinder`` on a whole ZTF quadrant cost 1.7 CPU s (its peak
verification loops over 130,000 candidates in Python), more than the rest of the
quadrant's photometry. The match only needs the detections near the stars it is
computed over, and a detection depends on the pixels within a few kernel radii
of its peak: the finder runs on a mosaic of cutouts around those stars,
separated by zeros as wide as its reach, which is what it sees beyond the
image's edges; its border exclusion is the real image's, given as a mask. The
detections near each star are those of the whole-image run (tested), and so is
the match (ZTF benchmark quadrant, 688 stars: 1.14 -> 0.13 CPU s, the same
medians, the rms to 2e-14 relative).
"""

from __future__ import annotations

import math
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
        Detections near the stars matched (within ``match_radius_px`` + 1 px;
        not the whole image's).
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
    # The image's border is excluded as a mask on the mosaic (_detect_around).
    finder = DAOStarFinder(threshold=threshold_sigma * noise_e, fwhm=fwhm_px, exclude_border=False)
    with np.errstate(invalid="ignore"):
        bright = np.nonzero(np.asarray(snr) >= min_snr)[0]
    if len(bright) == 0:
        return DetectionQA(0, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    xb, yb = np.asarray(x, np.float64)[bright], np.asarray(y, np.float64)[bright]
    det = _detect_around(fluence, xb, yb, finder, match_radius_px)
    if len(det) == 0:
        return DetectionQA(0, float("nan"), float("nan"), float("nan"), float("nan"), 0)
    dist, nearest = cKDTree(det).query(np.column_stack([xb, yb]))
    hit = dist <= match_radius_px
    dx = det[nearest[hit], 0] - xb[hit]
    dy = det[nearest[hit], 1] - yb[hit]
    if hit.sum() == 0:
        return DetectionQA(len(det), 0.0, float("nan"), float("nan"), float("nan"), 0)
    _, _, rms = sigma_clipped_stats(np.r_[dx - np.median(dx), dy - np.median(dy)])
    return DetectionQA(
        n_detected=len(det),
        match_rate=float(hit.mean()),
        dx_median_px=float(np.median(dx)),
        dy_median_px=float(np.median(dy)),
        astrometric_rms_px=float(rms),
        n_matched=int(hit.sum()),
    )


def _detect_around(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, finder: DAOStarFinder, radius_px: float
) -> np.ndarray:
    """Detections (m, 2), image pixels, of ``finder`` on a mosaic of cutouts
    around (x, y): those the finder returns on the whole image within
    ``radius_px`` + 1 of each position (a source near two positions twice).

    Reach of a detection: its peak is within ``radius_px`` + 1 of the position;
    the peak test looks ``min_separation`` around it on the convolved image,
    which looks a kernel radius further; the catalog's cutouts a kernel radius.
    """
    ny, nx = image.shape
    k_y, k_x = finder.kernel.y_radius, finder.kernel.x_radius
    sep = math.ceil(finder.min_separation)
    half = math.ceil(radius_px) + 1 + sep + max(k_y, k_x) + 2
    gap = sep + max(k_y, k_x) + 1  # zeros: what the finder sees beyond an edge
    cell = 2 * half + 1 + gap
    n = len(x)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = np.zeros((rows * cell + gap, cols * cell + gap))
    excluded = np.ones(mosaic.shape, bool)  # gaps, and the image's own border
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    shifts = np.empty((n, 2))
    for k in range(n):
        y0, y1 = max(iy[k] - half, 0), min(iy[k] + half + 1, ny)
        x0, x1 = max(ix[k] - half, 0), min(ix[k] + half + 1, nx)
        my = gap + (k // cols) * cell + (y0 - (iy[k] - half))
        mx = gap + (k % cols) * cell + (x0 - (ix[k] - half))
        mosaic[my : my + y1 - y0, mx : mx + x1 - x0] = image[y0:y1, x0:x1]
        excluded[
            my + max(k_y - y0, 0) : my + (y1 - y0) - max(y1 - (ny - k_y), 0),
            mx + max(k_x - x0, 0) : mx + (x1 - x0) - max(x1 - (nx - k_x), 0),
        ] = False
        shifts[k] = (x0 - mx, y0 - my)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        table = finder(mosaic, mask=excluded)
    if table is None or len(table) == 0:
        return np.zeros((0, 2))
    mx_, my_ = np.asarray(table["x_centroid"]), np.asarray(table["y_centroid"])
    cell_y = np.floor((my_ - gap / 2) / cell).astype(np.int64)
    cell_x = np.floor((mx_ - gap / 2) / cell).astype(np.int64)
    k = cell_y * cols + cell_x
    inside = (cell_x >= 0) & (cell_x < cols) & (k >= 0) & (k < n)
    k, mx_, my_ = k[inside], mx_[inside], my_[inside]
    dx, dy = mx_ + shifts[k, 0], my_ + shifts[k, 1]
    # Only detections near their cell's own star are the whole image's: others
    # may lie by the cutout's edge, where the finder saw zeros.
    near = np.hypot(dx - x[k], dy - y[k]) <= radius_px + 1.0
    return np.column_stack([dx[near], dy[near]])
