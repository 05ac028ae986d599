"""Crowding: the fraction of a star's aperture flux that its neighbours put in
it, from catalog neighbours and from detected sources the catalog lacks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from calib._filters import uniform_filter

# Flux ratio (neighbour / target) for index pairs (targets, neighbours).
_RatioFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _contamination(
    x: np.ndarray,
    y: np.ndarray,
    nx_: np.ndarray,
    ny_: np.ndarray,
    ratio_of: _RatioFn,
    *,
    radius_px: float,
    fwhm_px: float,
    beta: float,
    self_index: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of each target's aperture flux that its neighbours put in it.

    A neighbour at distance ``d`` with flux ratio ``R`` (neighbour / target)
    contributes ``R * pi r^2 * I(d)``, ``I`` the surface density of a Moffat PSF
    of the measured FWHM and index ``beta`` (heavier wings than most seeing, so
    the estimate errs on the safe side); within ``r + FWHM`` the whole ``R``
    counts. ``ratio_of(targets, neighbours)`` gives ``R`` for index pairs.
    """
    out = np.zeros(len(x))
    if len(x) == 0 or len(nx_) == 0:
        return out
    alpha2 = (fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))) ** 2
    reach = radius_px + 15.0 * fwhm_px
    ti, nj = _pairs_within(x, y, nx_, ny_, reach)
    if len(ti) == 0:
        return out
    if self_index is not None:
        keep = nj != self_index[ti]
        ti, nj = ti[keep], nj[keep]
    d = np.hypot(nx_[nj] - x[ti], ny_[nj] - y[ti])
    density = (beta - 1.0) / (np.pi * alpha2) * (1.0 + d * d / alpha2) ** (-beta)
    frac = np.where(d > radius_px + fwhm_px, np.pi * radius_px**2 * density, 1.0)
    ratio = np.asarray(ratio_of(ti, nj), dtype=np.float64)
    return np.bincount(ti, weights=ratio * frac, minlength=len(x))


def _pairs_within(
    x: np.ndarray, y: np.ndarray, nx_: np.ndarray, ny_: np.ndarray, reach: float
) -> tuple[np.ndarray, np.ndarray]:
    """(target, neighbour) index pairs closer than ``reach``, ordered by target,
    then neighbour (the order of per-target ball queries, so the sums below add
    in the same order), from one tree-to-tree query: no Python list per target."""
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    targets = cKDTree(np.column_stack([x[finite], y[finite]]))
    neighbours = cKDTree(np.column_stack([nx_, ny_]))
    pairs = targets.sparse_distance_matrix(neighbours, reach, output_type="ndarray")
    order = np.lexsort((pairs["j"], pairs["i"]))
    return finite[pairs["i"][order]].astype(np.int64), pairs["j"][order].astype(np.int64)


def _catalog_ratio(mag_t: np.ndarray, mag_all: np.ndarray) -> _RatioFn:
    # A neighbour or target of unknown magnitude counts as equally bright.
    def ratio(ti: np.ndarray, nj: np.ndarray) -> np.ndarray:
        dm = mag_all[nj] - mag_t[ti]
        return 10 ** (-0.4 * np.where(np.isfinite(dm), dm, 0.0))

    return ratio


def _flux_ratio(flux_t: np.ndarray, flux_n: np.ndarray) -> _RatioFn:
    def ratio(ti: np.ndarray, nj: np.ndarray) -> np.ndarray:
        target = flux_t[ti]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(target > 0, flux_n[nj] / target, np.inf)

    return ratio


def crowding_contamination(
    px: np.ndarray,
    py: np.ndarray,
    flux: np.ndarray,
    mags: np.ndarray,
    index: np.ndarray,
    x_all: np.ndarray,
    y_all: np.ndarray,
    mag_all: np.ndarray,
    segments: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    radius_px: float,
    fwhm_px: float,
    beta: float,
) -> np.ndarray:
    """Contamination by catalog neighbours plus detected uncatalogued ones."""
    catalog = _contamination(
        px,
        py,
        x_all,
        y_all,
        _catalog_ratio(mags, mag_all),
        radius_px=radius_px,
        fwhm_px=fwhm_px,
        beta=beta,
        self_index=index,
    )
    seg_x, seg_y, seg_flux = segments
    detected = _contamination(
        px,
        py,
        seg_x,
        seg_y,
        _flux_ratio(flux, seg_flux),
        radius_px=radius_px,
        fwhm_px=fwhm_px,
        beta=beta,
    )
    return catalog + detected


def uncatalogued_sources(
    fluence: np.ndarray,
    noise: float,
    x_cat: np.ndarray,
    y_cat: np.ndarray,
    *,
    match_px: float,
    threshold_sigma: float = 3.0,
    min_pixels: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids and fluxes of detected segments farther than ``match_px`` from
    every catalog position."""
    smooth = uniform_filter(np.asarray(fluence, np.float32), 3)
    labels, n = ndimage.label(smooth > threshold_sigma * max(noise, 1e-6) / 3.0)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    # Sums over the labelled pixels only (a few % of a 10 Mpix image).
    where = np.flatnonzero(labels)
    lab = labels.ravel()[where]
    values = fluence.ravel()[where].astype(np.float64)
    weights = np.clip(values, 0.0, None)
    yy, xx = np.divmod(where, fluence.shape[1])
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    flux = np.bincount(lab, weights=values, minlength=n + 1)[1:]
    wsum = np.bincount(lab, weights=weights, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(lab, weights=weights * xx, minlength=n + 1)[1:] / wsum
        cy = np.bincount(lab, weights=weights * yy, minlength=n + 1)[1:] / wsum
    ok = (sizes >= min_pixels) & (wsum > 0)
    cx, cy, flux = cx[ok], cy[ok], flux[ok]
    if len(x_cat) and len(cx):
        dist, _ = cKDTree(np.column_stack([x_cat, y_cat])).query(np.column_stack([cx, cy]))
        far = dist > match_px
        cx, cy, flux = cx[far], cy[far], flux[far]
    return cx, cy, flux
