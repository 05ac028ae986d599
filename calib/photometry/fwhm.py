"""The FWHM of a quadrant's PSF from adaptive second moments of a few stars."""

from __future__ import annotations

import numpy as np

from calib.photometry._psf import FWHM_TO_SIGMA

__all__ = ["measure_fwhm"]


def measure_fwhm(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    guess_px: float,
    max_stars: int = 50,
    niter: int = 12,
) -> float:
    """Median FWHM of a few stars from adaptive (Gaussian-weighted) second moments.

    The weight's width is iterated until it matches the star's
    (``sigma_w^2 <- 2 M``, with ``M`` the weighted second moment per axis), which
    converges to the sigma of the best-matching Gaussian; the pixel's own
    variance (1/12 px^2) is removed. Vectorised over stars: a fraction of a
    millisecond per star, against ~0.1 s per quadrant for a least-squares fit.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image.
    x, y : ndarray, shape (n,), pixels
        Bright, isolated, unflagged stars, brightest first.
    guess_px : float
        Starting FWHM; returned when fewer than 3 stars converge.
    max_stars : int
        At most this many stars are used.
    niter : int

    Returns
    -------
    float, pixels
    """
    if guess_px <= 0:
        raise ValueError(f"guess_px must be > 0, got {guess_px}")
    x = np.asarray(x, dtype=np.float64)[:max_stars]
    y = np.asarray(y, dtype=np.float64)[:max_stars]
    if len(x) < 3:
        return float(guess_px)
    h = int(np.ceil(3.0 * guess_px))
    offs = np.arange(-h, h + 1)
    ny, nx = image.shape
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    px = np.clip(ix[:, None, None] + offs[None, None, :], 0, nx - 1)
    py = np.clip(iy[:, None, None] + offs[None, :, None], 0, ny - 1)
    cut = np.asarray(image, dtype=np.float64)[py, px]  # (n, s, s)
    r2 = (px - x[:, None, None]) ** 2 + (py - y[:, None, None]) ** 2
    sigma2 = np.full(len(x), (guess_px * FWHM_TO_SIGMA) ** 2)
    for _ in range(niter):
        w = np.exp(-0.5 * r2 / sigma2[:, None, None]) * cut
        with np.errstate(invalid="ignore", divide="ignore"):
            moment = 0.5 * (w * r2).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
        sigma2 = np.clip(2.0 * moment, 0.05, (3.0 * guess_px) ** 2)
    sigma2 = sigma2 - 1.0 / 12.0
    fwhm = np.sqrt(np.where(sigma2 > 0, sigma2, np.nan)) / FWHM_TO_SIGMA
    fwhm = fwhm[np.isfinite(fwhm) & (fwhm > 0.3 * guess_px) & (fwhm < 2.9 * guess_px)]
    return float(np.median(fwhm)) if len(fwhm) >= 3 else float(guess_px)
