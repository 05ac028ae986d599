"""Pixel-area maps from a celestial WCS: the determinant of the Jacobian of the
pixel -> sky mapping, relative to the nominal pixel (seed 003).

A dome-flattened image is a surface-brightness image; multiplying it by the
relative pixel area gives the fluence image on which stars are photometered.

Two evaluations, which agree to ~1e-7 on TAN-SIP headers (tests check it):

- ``method='analytic'`` for TAN and TAN-SIP WCSs: the SIP polynomial is
  differentiated term by term and the gnomonic projection contributes
  ``cos^3(theta) = (1 + rho^2)^(-3/2)``, ``rho`` the distance from the tangent
  point in the projection plane (radians). Exact, vectorised, independent of
  ``CRVAL``.
- ``method='numeric'`` for any 2-D celestial WCS: central finite differences of
  the unit vectors on the sphere, ``|d n / dx x d n / dy|``, evaluated on a coarse
  grid and interpolated with a bicubic spline (the area is smooth on the scale of
  tens of pixels).

The nominal pixel is ``|det(CD)|`` (``wcs.pixel_scale_matrix``): the solid angle of
a pixel at the tangent point without distortion, which is the simulator's
normalisation ("relative to the axis pixel").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
from astropy.wcs import WCS
from scipy.interpolate import RectBivariateSpline

__all__ = ["PixelAreaCache", "PixelAreaMethod", "pixel_area_key", "pixel_area_map"]

PixelAreaMethod = Literal["auto", "analytic", "numeric"]

_NUMERIC_STEP_PX = 0.5
_NUMERIC_GRID_PX = 32
_DIRECT_MAX_PIXELS = 512 * 512


def pixel_area_map(
    wcs: WCS,
    shape: tuple[int, int],
    *,
    method: PixelAreaMethod = "auto",
) -> np.ndarray:
    """Pixel solid angle relative to the nominal pixel, for every pixel of an image.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS whose pixel ``(x, y)`` (0-based) is pixel ``(x, y)`` of the image.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    method : {'auto', 'analytic', 'numeric'}
        ``auto`` uses ``analytic`` for TAN/TAN-SIP WCSs without other distortion
        tables, ``numeric`` otherwise.

    Returns
    -------
    ndarray, shape (ny, nx), float64, dimensionless
        ``dOmega(x, y) / |det CD|``; 1 at the tangent point of an undistorted TAN WCS.

    Raises
    ------
    ValueError
        If ``shape`` is not two positive integers, ``wcs`` is not 2-D celestial, or
        ``method='analytic'`` is asked of a WCS that is not TAN(-SIP).
    """
    ny, nx = _check_shape(shape)
    if not isinstance(wcs, WCS) or wcs.naxis != 2 or not wcs.has_celestial:
        raise ValueError("wcs must be a 2-D celestial astropy.wcs.WCS")
    analytic_ok = _is_plain_tan(wcs)
    if method == "auto":
        method = "analytic" if analytic_ok else "numeric"
    if method == "analytic":
        if not analytic_ok:
            raise ValueError(
                "method='analytic' needs a TAN or TAN-SIP WCS without lookup-table "
                "distortions; use method='numeric'"
            )
        return _analytic_area(wcs, ny, nx)
    if method == "numeric":
        return _numeric_area(wcs, ny, nx)
    raise ValueError(f"method must be 'auto', 'analytic' or 'numeric', got {method!r}")


def pixel_area_key(wcs: WCS, shape: tuple[int, int]) -> tuple:
    """Hashable key of everything the pixel-area map depends on.

    For a TAN(-SIP) WCS the map does not depend on ``CRVAL`` (where the telescope
    points), so every exposure of a night shares one map per quadrant.
    """
    w = wcs.wcs
    key: tuple = (tuple(int(s) for s in shape), tuple(w.ctype), tuple(w.crpix))
    key += (tuple(np.asarray(wcs.pixel_scale_matrix).ravel()),)
    if wcs.sip is not None:
        key += (tuple(wcs.sip.crpix), wcs.sip.a.tobytes(), wcs.sip.b.tobytes())
    if not _is_plain_tan(wcs):
        # Other projections depend on where the reference point is on the sky.
        key += (tuple(w.crval), tuple(w.pv) if hasattr(w, "pv") else ())
    return key


@dataclass
class PixelAreaCache:
    """Pixel-area maps cached by :func:`pixel_area_key`, least recently used first out.

    One map per quadrant serves every exposure whose WCS differs only in pointing.

    Parameters
    ----------
    maxsize : int
        Maps kept at most.
    max_bytes : int
        Bytes kept at most (the last map always stays). A ZTF-size map is 75 MB
        in float64: the whole focal plane's 64 maps would be 4.8 GB of a worker,
        so by default 6 maps stay; a miss costs the analytic map's 0.21 s
        (ZTF TAN-SIP, this machine), which benchmarks/photometry.py's chain
        counts in every quadrant (docs/nightly.md).
    """

    maxsize: int = 64
    max_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if self.maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {self.maxsize}")
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        self._maps: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self, wcs: WCS, shape: tuple[int, int], *, method: PixelAreaMethod = "auto"
    ) -> np.ndarray:
        """The map for ``wcs`` and ``shape`` (read-only), computed on first use."""
        key = (*pixel_area_key(wcs, shape), method)
        if key in self._maps:
            self.hits += 1
            self._maps.move_to_end(key)
            return self._maps[key]
        self.misses += 1
        area = pixel_area_map(wcs, shape, method=method)
        area.flags.writeable = False
        self._maps[key] = area
        while len(self._maps) > 1 and (
            len(self._maps) > self.maxsize
            or sum(m.nbytes for m in self._maps.values()) > self.max_bytes
        ):
            self._maps.popitem(last=False)
        return area


# --- helpers ----------------------------------------------------------------------


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (ny, nx), got {shape!r}") from None
    if ny < 1 or nx < 1:
        raise ValueError(f"shape must be two positive integers, got {shape!r}")
    return ny, nx


def _is_plain_tan(wcs: WCS) -> bool:
    projections = {c[5:8] for c in wcs.wcs.ctype}
    return (
        projections == {"TAN"}
        and wcs.cpdis1 is None
        and wcs.cpdis2 is None
        and wcs.det2im1 is None
        and wcs.det2im2 is None
    )


def _sip_jacobian_det(wcs: WCS, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distorted offsets (u', v') and det d(u', v')/d(u, v) of the forward SIP."""
    if wcs.sip is None:
        return u, v, np.ones_like(u)
    up, vp = u.copy(), v.copy()
    dup_du, dup_dv = np.ones_like(u), np.zeros_like(u)
    dvp_du, dvp_dv = np.zeros_like(u), np.ones_like(u)
    for coeffs, out, d_du, d_dv in (
        (wcs.sip.a, up, dup_du, dup_dv),
        (wcs.sip.b, vp, dvp_du, dvp_dv),
    ):
        for p, q in zip(*np.nonzero(coeffs), strict=True):
            c = coeffs[p, q]
            out += c * u**p * v**q
            if p:
                d_du += c * p * u ** (p - 1) * v**q
            if q:
                d_dv += c * q * u**p * v ** (q - 1)
    return up, vp, dup_du * dvp_dv - dup_dv * dvp_du


def _analytic_area(wcs: WCS, ny: int, nx: int) -> np.ndarray:
    if ny * nx <= _DIRECT_MAX_PIXELS:
        return _analytic_at(wcs, np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64))
    # Large images: exact values on a coarse grid, bicubic spline in between (the
    # area is a low-order polynomial over the frame: < 1e-9 interpolation error,
    # 30x faster than every pixel).
    gx = np.unique(np.r_[np.arange(0, nx, _NUMERIC_GRID_PX), nx - 1]).astype(np.float64)
    gy = np.unique(np.r_[np.arange(0, ny, _NUMERIC_GRID_PX), ny - 1]).astype(np.float64)
    spline = RectBivariateSpline(gy, gx, _analytic_at(wcs, gy, gx), kx=3, ky=3)
    return spline(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64))


def _analytic_at(wcs: WCS, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact relative area on the grid ``y`` x ``x`` (0-based pixels)."""
    crpix = wcs.sip.crpix if wcs.sip is not None else wcs.wcs.crpix
    # FITS pixels are 1-based: 0-based pixel x is FITS pixel x + 1.
    u = x + 1.0 - crpix[0]
    v = y + 1.0 - crpix[1]
    uu, vv = np.meshgrid(u, v)  # (len(y), len(x))
    up, vp, det_sip = _sip_jacobian_det(wcs, uu, vv)
    cd = np.deg2rad(np.asarray(wcs.pixel_scale_matrix))  # rad per pixel
    x = cd[0, 0] * up + cd[0, 1] * vp
    y = cd[1, 0] * up + cd[1, 1] * vp
    # Gnomonic projection: dOmega = dx dy / (1 + rho^2)^(3/2).
    return np.abs(det_sip) * (1.0 + x * x + y * y) ** -1.5


def _unit_vectors(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    lon, lat = wcs.all_pix2world(x, y, 0)
    lon, lat = np.deg2rad(lon), np.deg2rad(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def _numeric_area(wcs: WCS, ny: int, nx: int) -> np.ndarray:
    gx = np.unique(np.r_[np.arange(0, nx, _NUMERIC_GRID_PX), nx - 1]).astype(np.float64)
    gy = np.unique(np.r_[np.arange(0, ny, _NUMERIC_GRID_PX), ny - 1]).astype(np.float64)
    coarse = len(gx) >= 4 and len(gy) >= 4
    if not coarse:
        # Too small for a spline: evaluate at every pixel.
        gx, gy = np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64)
    xx, yy = np.meshgrid(gx, gy)
    h = _NUMERIC_STEP_PX
    dndx = (_unit_vectors(wcs, xx + h, yy) - _unit_vectors(wcs, xx - h, yy)) / (2 * h)
    dndy = (_unit_vectors(wcs, xx, yy + h) - _unit_vectors(wcs, xx, yy - h)) / (2 * h)
    omega = np.linalg.norm(np.cross(dndx, dndy), axis=-1)  # (len(gy), len(gx)), sr per pixel
    nominal = abs(np.linalg.det(np.deg2rad(np.asarray(wcs.pixel_scale_matrix))))
    rel = omega / nominal
    if not coarse:
        return rel
    spline = RectBivariateSpline(gy, gx, rel, kx=3, ky=3)
    return spline(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64))
