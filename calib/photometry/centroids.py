"""Gaussian-windowed centroids (SExtractor's XWIN), vectorised over stars."""

from __future__ import annotations

import numpy as np

from calib.photometry._psf import FWHM_TO_SIGMA

__all__ = ["refine_centroids"]


def refine_centroids(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    fwhm_px: float,
    niter: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (SExtractor's ``XWIN``), vectorised over stars.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image.
    x, y : ndarray, shape (n,), pixels
        Starting positions.
    fwhm_px : float
        Window FWHM.
    niter : int
        Iterations.

    Returns
    -------
    xc, yc : ndarray, shape (n,), pixels
        NaN where the window holds no positive flux.
    """
    image = np.asarray(image)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if fwhm_px <= 0:
        raise ValueError(f"fwhm_px must be > 0, got {fwhm_px}")
    sigma = fwhm_px * FWHM_TO_SIGMA
    h = int(np.ceil(3.0 * sigma))
    offs = np.arange(-h, h + 1)
    ny, nx = image.shape
    xc, yc = x.copy(), y.copy()
    lost = ~np.isfinite(xc + yc)
    for _ in range(niter):
        # A star lost on an earlier iteration keeps sampling at its start.
        ix = np.rint(np.where(lost, np.nan_to_num(x), xc)).astype(np.int64)
        iy = np.rint(np.where(lost, np.nan_to_num(y), yc)).astype(np.int64)
        px = np.clip(ix[:, None, None] + offs[None, None, :], 0, nx - 1)  # (n, 1, s)
        py = np.clip(iy[:, None, None] + offs[None, :, None], 0, ny - 1)  # (n, s, 1)
        cut = image[py, px]  # (n, s, s)
        dx = px - xc[:, None, None]
        dy = py - yc[:, None, None]
        w = np.exp(-0.5 * (dx * dx + dy * dy) / (sigma * sigma)) * cut
        norm = w.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            # The XWIN update: twice the weighted first moment.
            step_x = 2.0 * (w * dx).sum(axis=(1, 2)) / norm
            step_y = 2.0 * (w * dy).sum(axis=(1, 2)) / norm
        lost |= ~(norm > 0)
        xc = np.where(lost, np.nan, xc + np.clip(np.nan_to_num(step_x), -1.0, 1.0))
        yc = np.where(lost, np.nan, yc + np.clip(np.nan_to_num(step_y), -1.0, 1.0))
    return xc, yc
