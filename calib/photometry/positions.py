"""Pixel positions of reference-catalog stars from an image's WCS."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

__all__ = ["catalog_positions"]


def catalog_positions(
    wcs: WCS,
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    shape: tuple[int, int],
    *,
    margin_px: float = 20.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions of catalog stars on (or within ``margin_px`` of) an image.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the image (0-based pixels).
    ra_deg, dec_deg : ndarray, shape (n,), deg
    shape : tuple of int
        ``(ny, nx)``.
    margin_px : float
        Stars this far outside the image are kept (as crowding neighbours).

    Returns
    -------
    rows : ndarray, int64
        Catalog rows kept.
    x, y : ndarray, float64, pixels
        Their 0-based positions (full SIP inversion).
    """
    ra_deg = np.asarray(ra_deg, dtype=np.float64)
    dec_deg = np.asarray(dec_deg, dtype=np.float64)
    if ra_deg.shape != dec_deg.shape or ra_deg.ndim != 1:
        raise ValueError(f"ra_deg and dec_deg must be 1-D of one length, got {ra_deg.shape}")
    ny, nx = shape
    # Cheap cut on the sphere first: the SIP inversion is the costly part.
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    corners_x = np.array([cx, -margin_px, nx + margin_px, -margin_px, nx + margin_px])
    corners_y = np.array([cy, -margin_px, -margin_px, ny + margin_px, ny + margin_px])
    cra, cdec = wcs.all_pix2world(corners_x, corners_y, 0)
    reach = _angular_distance(cra[0], cdec[0], cra[1:], cdec[1:]).max() * 1.01
    near = np.nonzero(_angular_distance(cra[0], cdec[0], ra_deg, dec_deg) <= reach)[0]
    if len(near) == 0:
        return near.astype(np.int64), np.zeros(0), np.zeros(0)
    x, y = wcs.all_world2pix(ra_deg[near], dec_deg[near], 0, tolerance=1e-6, maxiter=50)
    keep = (
        (x > -0.5 - margin_px)
        & (x < nx - 0.5 + margin_px)
        & (y > -0.5 - margin_px)
        & (y < ny - 0.5 + margin_px)
    )
    return near[keep].astype(np.int64), np.asarray(x[keep]), np.asarray(y[keep])


def _angular_distance(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    a0, d0, a, d = (np.deg2rad(v) for v in (ra0, dec0, ra, dec))
    cos_d = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    return np.rad2deg(np.arccos(np.clip(cos_d, -1.0, 1.0)))
