"""Exact-overlap circular aperture sums."""

from __future__ import annotations

import numpy as np
from photutils.aperture import CircularAperture

__all__ = ["aperture_sums"]


def aperture_sums(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius_px: float,
    *,
    variance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact-overlap circular aperture sums (photutils ``CircularAperture``).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    x, y : ndarray, shape (n,), pixels
        Centres, 0-based (pixel centres at integers).
    radius_px : float
    variance : ndarray, shape (ny, nx), optional
        Per-pixel variance, summed with the same weights.

    Returns
    -------
    sums, variances : ndarray, shape (n,)
        Variances are zero when ``variance`` is not given.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if radius_px <= 0:
        raise ValueError(f"radius_px must be > 0, got {radius_px}")
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    aperture = CircularAperture(np.column_stack([x, y]), r=radius_px)
    error = None if variance is None else np.sqrt(np.asarray(variance, dtype=np.float64))
    # do_photometry is aperture_photometry without building a QTable (~10 ms a call).
    sums, errors = aperture.do_photometry(
        np.asarray(image, dtype=np.float64), error=error, method="exact"
    )
    sums = np.asarray(sums, dtype=np.float64)
    if variance is None:
        return sums, np.zeros_like(sums)
    return sums, np.asarray(errors, dtype=np.float64) ** 2
