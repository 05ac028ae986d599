"""Focal-plane geometry of the simulated camera: quadrants, WCS, pixel area.

The optical distortion is a cubic radial term written exactly as TAN-SIP
coefficients, ``u' = u (1 + kappa r^2)`` with ``r`` in pixels from the optical
axis, so the FITS headers describe the true mapping and the pixel-area truth is
the determinant of that mapping's Jacobian times the TAN projection's cos^3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from astropy.io import fits

from sim.config import CameraConfig

# (qx, qy) position of each QID inside its CCD: Q1 top right, then counter-clockwise.
_QID_POSITION = {1: (1, 1), 2: (0, 1), 3: (0, 0), 4: (1, 0)}


def quadrant_id(ccd_id: int, qid: int) -> int:
    """Integer quadrant id used everywhere downstream: ``4 (ccd_id - 1) + qid - 1``."""
    return 4 * (ccd_id - 1) + (qid - 1)


@dataclass(frozen=True)
class QuadrantGeometry:
    """Where one readout quadrant sits in the mosaic."""

    quadrant: int
    ccd_id: int
    qid: int
    x0: int
    """Mosaic column of the quadrant's data pixel x = 0."""
    y0: int
    nx: int
    ny: int
    n_overscan: int

    @property
    def extname(self) -> str:
        return f"CCD{self.ccd_id:02d}_Q{self.qid}"

    @property
    def overscan_left(self) -> bool:
        """The overscan sits on the readout side: left for Q2/Q3, right for Q1/Q4."""
        return self.qid in (2, 3)

    @property
    def data_slice(self) -> slice:
        """Columns of the raw array holding the data section."""
        start = self.n_overscan if self.overscan_left else 0
        return slice(start, start + self.nx)

    @property
    def overscan_slice(self) -> slice:
        start = 0 if self.overscan_left else self.nx
        return slice(start, start + self.n_overscan)

    def sections(self) -> dict[str, str]:
        """IRAF DATASEC/BIASSEC/DETSEC strings (1-based, inclusive)."""
        d, b = self.data_slice, self.overscan_slice
        return {
            "DATASEC": f"[{d.start + 1}:{d.stop},1:{self.ny}]",
            "BIASSEC": f"[{b.start + 1}:{b.stop},1:{self.ny}]",
            "DETSEC": f"[{self.x0 + 1}:{self.x0 + self.nx},{self.y0 + 1}:{self.y0 + self.ny}]",
        }


class Camera:
    """The mosaic described by a :class:`CameraConfig`."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        c = config
        if not c.ccd_cols or not c.ccd_rows:
            raise ValueError("camera needs at least one CCD column and row")
        ccd_w, ccd_h = 2 * c.quad_nx, 2 * c.quad_ny
        quads = []
        for j, row in enumerate(sorted(c.ccd_rows)):
            for i, col in enumerate(sorted(c.ccd_cols)):
                ccd_id = 1 + col + 4 * row
                ox, oy = i * (ccd_w + c.ccd_gap_px), j * (ccd_h + c.ccd_gap_px)
                for qid, (qx, qy) in _QID_POSITION.items():
                    quads.append(
                        QuadrantGeometry(
                            quadrant=quadrant_id(ccd_id, qid),
                            ccd_id=ccd_id,
                            qid=qid,
                            x0=ox + qx * c.quad_nx,
                            y0=oy + qy * c.quad_ny,
                            nx=c.quad_nx,
                            ny=c.quad_ny,
                            n_overscan=c.n_overscan,
                        )
                    )
        self.quadrants: tuple[QuadrantGeometry, ...] = tuple(
            sorted(quads, key=lambda g: g.quadrant)
        )
        self.by_id = {g.quadrant: g for g in self.quadrants}
        n_c, n_r = len(c.ccd_cols), len(c.ccd_rows)
        self.mosaic_nx = n_c * ccd_w + (n_c - 1) * c.ccd_gap_px
        self.mosaic_ny = n_r * ccd_h + (n_r - 1) * c.ccd_gap_px
        # Optical axis at the mosaic centre, in 0-based mosaic pixel coordinates.
        self.axis_x = (self.mosaic_nx - 1) / 2.0
        self.axis_y = (self.mosaic_ny - 1) / 2.0
        self.corner_radius_px = math.hypot(self.axis_x + 0.5, self.axis_y + 0.5)
        k = (-4.0 + math.sqrt(16.0 + 12.0 * c.area_excess_at_corner)) / 6.0
        self.kappa = k / self.corner_radius_px**2
        """Cubic distortion coefficient [1/px^2]; (1+kR^2)(1+3kR^2) = 1 + excess."""
        self.scale_deg = c.pixel_scale_arcsec / 3600.0

    @cached_property
    def quadrant_ids(self) -> np.ndarray:
        return np.array([g.quadrant for g in self.quadrants], dtype=np.int64)

    def field_half_size_deg(self) -> tuple[float, float]:
        return (self.mosaic_nx / 2 * self.scale_deg, self.mosaic_ny / 2 * self.scale_deg)

    def offsets(self, quadrant: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets (u, v) from the optical axis for every pixel, shape (ny, nx)."""
        g = self.by_id[quadrant]
        u = g.x0 + np.arange(g.nx, dtype=np.float64) - self.axis_x
        v = g.y0 + np.arange(g.ny, dtype=np.float64) - self.axis_y
        return np.meshgrid(u, v)

    def radius_norm(self, quadrant: int) -> np.ndarray:
        """Distance from the optical axis in units of the corner radius, (ny, nx)."""
        u, v = self.offsets(quadrant)
        return np.hypot(u, v) / self.corner_radius_px

    def area_from_offsets(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Relative pixel solid angle at pixel offsets (u, v) from the axis."""
        r2 = u * u + v * v
        radial = (1.0 + self.kappa * r2) * (1.0 + 3.0 * self.kappa * r2)
        rho = np.deg2rad(self.scale_deg) * np.sqrt(r2) * (1.0 + self.kappa * r2)
        return radial * np.cos(np.arctan(rho)) ** 3

    def area_map(self, quadrant: int) -> np.ndarray:
        """Pixel solid angle relative to the nominal pixel at the axis, (ny, nx)."""
        return self.area_from_offsets(*self.offsets(quadrant))

    def distortion_jacobian(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """d(u', v')/d(u, v) of the SIP distortion, shape (..., 2, 2)."""
        r2 = u * u + v * v
        k = self.kappa
        jac = np.empty((*np.shape(u), 2, 2))
        jac[..., 0, 0] = 1 + k * r2 + 2 * k * u * u
        jac[..., 0, 1] = 2 * k * u * v
        jac[..., 1, 0] = 2 * k * u * v
        jac[..., 1, 1] = 1 + k * r2 + 2 * k * v * v
        return jac

    def wcs_cards(self, quadrant: int, ra_deg: float, dec_deg: float) -> list[tuple]:
        """TAN-SIP WCS header cards of a quadrant for a pointing at the axis."""
        g = self.by_id[quadrant]
        # Pixel coordinates in the header are those of the full raw array, whose
        # data section may start after a left overscan.
        crpix1 = self.axis_x - g.x0 + 1 + g.data_slice.start
        crpix2 = self.axis_y - g.y0 + 1
        k = self.kappa
        return [
            ("WCSAXES", 2, ""),
            ("CTYPE1", "RA---TAN-SIP", ""),
            ("CTYPE2", "DEC--TAN-SIP", ""),
            ("CUNIT1", "deg", ""),
            ("CUNIT2", "deg", ""),
            ("CRVAL1", float(ra_deg), "[deg] RA at the optical axis"),
            ("CRVAL2", float(dec_deg), "[deg] Dec at the optical axis"),
            ("CRPIX1", float(crpix1), "optical axis, raw-array pixel"),
            ("CRPIX2", float(crpix2), ""),
            ("CD1_1", -self.scale_deg, ""),
            ("CD1_2", 0.0, ""),
            ("CD2_1", 0.0, ""),
            ("CD2_2", self.scale_deg, ""),
            ("A_ORDER", 3, ""),
            ("A_3_0", k, "cubic radial distortion"),
            ("A_1_2", k, ""),
            ("B_ORDER", 3, ""),
            ("B_2_1", k, ""),
            ("B_0_3", k, ""),
        ]

    def mosaic_wcs_header(self, ra_deg: float, dec_deg: float) -> fits.Header:
        """A WCS for the whole mosaic (0-based mosaic pixels + 1), used to place stars."""
        hdr = fits.Header()
        for key, value, comment in self.wcs_cards(self.quadrants[0].quadrant, ra_deg, dec_deg):
            hdr[key] = (value, comment)
        hdr["CRPIX1"] = self.axis_x + 1
        hdr["CRPIX2"] = self.axis_y + 1
        return hdr

    def locate(self, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
        """Quadrant id of 0-based mosaic positions, -1 where none (gaps, outside)."""
        out = np.full(np.shape(mx), -1, dtype=np.int64)
        for g in self.quadrants:
            inside = (mx >= g.x0 - 0.5) & (mx < g.x0 + g.nx - 0.5)
            inside &= (my >= g.y0 - 0.5) & (my < g.y0 + g.ny - 0.5)
            out[inside] = g.quadrant
        return out
