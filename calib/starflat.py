"""Starflats: the zero-point variation of a star with its position on the camera,
``dzp(quadrant, x, y)``, as a constant per superpixel cell of each quadrant
(BRIEF §1 step 4; seed 004, "starflat procedure").

Convention (docs/simulator.md): ``m = m_inst + zp + dzp_starflat``. This module
holds the fitted field only; it is fitted by the ubercal solver
(:func:`calib.ubercal.solve_ubercal`), inside a full ubercal or alone on a
dithered sequence with :func:`calib.ubercal.fit_starflat`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Starflat", "cell_index"]


@dataclass(frozen=True)
class Starflat:
    """A fitted starflat: one delta-zp per superpixel cell of each quadrant.

    Attributes
    ----------
    quadrants : ndarray, shape (n_q,), int64
        Quadrant ids (``4 (CCD_ID - 1) + QID - 1``) the field covers.
    dzp_mag : ndarray, shape (n_q, ncy, ncx), mag
        Delta zero point of each cell; NaN for cells without constraining data.
    dzp_err_mag : ndarray, shape (n_q, ncy, ncx), mag
        Its uncertainty, in the same gauge.
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size: cell ``(cy, cx)`` covers
        ``x in [cx, cx + 1) * quad_nx / ncx`` and likewise in y.
    gauge : {'quadrant', 'focal_plane'}
        ``'quadrant'``: each quadrant's cells average to zero (its mean lives in the
        per exposure-quadrant zero points); ``'focal_plane'``: all cells average to
        zero (per-exposure zero points), so quadrant offsets are part of the field.
    prior_dominated : ndarray of bool, shape (n_q, ncy, ncx), optional
        Cells on which the data carry less information than the fit's prior
        (``UbercalOptions.starflat_prior_mag``): they sit near 0 with nearly the
        prior's error. None: no cell is.
    """

    quadrants: np.ndarray
    dzp_mag: np.ndarray
    dzp_err_mag: np.ndarray
    quad_nx: int
    quad_ny: int
    gauge: str
    prior_dominated: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.dzp_mag.ndim != 3 or self.dzp_mag.shape[0] != len(self.quadrants):
            raise ValueError(
                f"dzp_mag must have shape (n_quadrants={len(self.quadrants)}, ncy, ncx), "
                f"got {self.dzp_mag.shape}"
            )
        if self.dzp_err_mag.shape != self.dzp_mag.shape:
            raise ValueError("dzp_err_mag must have the shape of dzp_mag")
        if self.prior_dominated is not None and self.prior_dominated.shape != self.dzp_mag.shape:
            raise ValueError("prior_dominated must have the shape of dzp_mag")

    @property
    def cells(self) -> tuple[int, int]:
        """Grid shape (ncy, ncx)."""
        return self.dzp_mag.shape[1], self.dzp_mag.shape[2]

    def cell_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell (cy, cx) of 0-based data-section positions; edges clip inwards."""
        return cell_index(x, y, quad_nx=self.quad_nx, quad_ny=self.quad_ny, cells=self.cells)

    def evaluate(self, quadrant: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Starflat delta-zp at positions on quadrants.

        Parameters
        ----------
        quadrant : array_like of int, shape (n,)
            Quadrant ids; ids the field does not cover raise ``ValueError``.
        x, y : array_like, shape (n,), pixels
            0-based data-section positions.

        Returns
        -------
        ndarray, shape (n,), mag
            ``dzp`` such that ``m = m_inst + zp + dzp``.
        """
        quadrant = np.asarray(quadrant, dtype=np.int64)
        row = np.searchsorted(self.quadrants, quadrant)
        row = np.clip(row, 0, len(self.quadrants) - 1)
        if len(quadrant) and np.any(self.quadrants[row] != quadrant):
            missing = np.unique(quadrant[self.quadrants[row] != quadrant])
            raise ValueError(f"quadrant: ids {missing.tolist()} are not covered by this starflat")
        cy, cx = self.cell_index(np.asarray(x), np.asarray(y))
        return self.dzp_mag[row, cy, cx]


def cell_index(
    x: np.ndarray, y: np.ndarray, *, quad_nx: int, quad_ny: int, cells: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Superpixel cell (cy, cx) of 0-based data-section pixel positions.

    Pixel ``i`` covers ``[i - 0.5, i + 0.5)``; cell boundaries fall on multiples of
    ``quad_n / n_cells`` in that continuous coordinate, and positions off the
    quadrant by less than a pixel are clipped into the edge cells.
    """
    ncy, ncx = cells
    cx = np.floor((np.asarray(x) + 0.5) * (ncx / quad_nx)).astype(np.int64)
    cy = np.floor((np.asarray(y) + 0.5) * (ncy / quad_ny)).astype(np.int64)
    return np.clip(cy, 0, ncy - 1), np.clip(cx, 0, ncx - 1)
