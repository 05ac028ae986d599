"""Parameter layout: which exposures, quadrants and stars a problem has, and the
parameter index of every model term of an observation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.starflat import cell_index
from calib.ubercal.errors import UbercalError
from calib.ubercal.observations import (
    ObservationChunk,
    ObservationSource,
    ReferenceStars,
    _chunk_ids,
    _lookup,
)
from calib.ubercal.options import UbercalOptions
from calib.ubercal.sizing import ModelSizing, size_model


@dataclass(frozen=True)
class UbercalLayout:
    """Parameter indexing of one ubercal problem.

    The parameter vector is ``[zp (n_zp) | cells (n_q * ncy * ncx) | colour (n_q) |
    gradients (2 n_exp) | anchor colour coefficient (1)]``, each block present when
    enabled; zero point ``e * n_q + iq`` per exposure-quadrant or ``e`` per
    exposure; cell ``iq * ncy * ncx + cy * ncx + cx``; gradient ``2 e`` (x), ``2 e + 1``
    (y).

    Attributes
    ----------
    expids : ndarray, shape (n_exp,), int64
    quadrants : ndarray, shape (n_q,), int64
    source_ids : ndarray, shape (n_star,), int64
    colour : ndarray, shape (n_star,), mag
        ``bp_rp - colour_pivot``; 0 where unknown.
    ref_mag, ref_mag_err : ndarray, shape (n_star,), mag
        Reference magnitudes matched to ``source_ids``; NaN where none.
    ref_bp_rp : ndarray, shape (n_star,), mag
    quad_nx, quad_ny : int, pixels
    options : UbercalOptions
        With ``zp_mode`` and ``cells`` settled (never ``'auto'``).
    sizing : ModelSizing or None
        How they were settled.
    """

    expids: np.ndarray
    quadrants: np.ndarray
    source_ids: np.ndarray
    colour: np.ndarray
    ref_mag: np.ndarray
    ref_mag_err: np.ndarray
    ref_bp_rp: np.ndarray
    quad_nx: int
    quad_ny: int
    options: UbercalOptions
    sizing: ModelSizing | None = None

    @property
    def n_star(self) -> int:
        return len(self.source_ids)

    @property
    def n_q(self) -> int:
        return len(self.quadrants)

    @property
    def n_zp(self) -> int:
        n_e = len(self.expids)
        return n_e * self.n_q if self.options.zp_mode == "exposure_quadrant" else n_e

    @property
    def n_cell_per_q(self) -> int:
        return self.options.grid[0] * self.options.grid[1]

    @property
    def n_cell(self) -> int:
        return self.n_q * self.n_cell_per_q if self.options.starflat else 0

    @property
    def n_colour(self) -> int:
        return self.n_q if self.options.colour_term else 0

    @property
    def n_param(self) -> int:
        return self.n_zp + self.n_cell + self.n_colour + self.n_gradient + self.n_anchor

    @property
    def n_gradient(self) -> int:
        return 2 * len(self.expids) if self.options.exposure_gradient else 0

    @property
    def gradient_start(self) -> int:
        return self.n_zp + self.n_cell + self.n_colour

    @property
    def colour_slice(self) -> slice:
        start = self.n_zp + self.n_cell
        return slice(start, start + self.n_colour)

    @property
    def n_anchor(self) -> int:
        """1 when the reference catalog enters as a prior (its colour coefficient)."""
        return int(self.options.anchor == "prior" and self.has_reference)

    @property
    def has_reference(self) -> bool:
        return bool(np.isfinite(self.ref_mag).any())

    def index(self, chunk: ObservationChunk) -> _Indexed:
        """Map a chunk's identifiers to parameter indices (-1 where unknown)."""
        e = _lookup(self.expids, chunk.expid)
        iq = _lookup(self.quadrants, chunk.quadrant)
        s = _lookup(self.source_ids, chunk.source_id)
        valid = (e >= 0) & (iq >= 0) & (s >= 0)
        zp = e * self.n_q + iq if self.options.zp_mode == "exposure_quadrant" else e.copy()
        cy, cx = cell_index(
            chunk.x, chunk.y, quad_nx=self.quad_nx, quad_ny=self.quad_ny, cells=self.options.grid
        )
        cell = iq * self.n_cell_per_q + cy * self.options.grid[1] + cx
        qy, qx = cell_index(
            chunk.x,
            chunk.y,
            quad_nx=self.quad_nx,
            quad_ny=self.quad_ny,
            cells=self.options.qa_cells,
        )
        qa = (
            iq * (self.options.qa_cells[0] * self.options.qa_cells[1])
            + qy * self.options.qa_cells[1]
            + qx
        )
        return _Indexed(
            star=s,
            zp=zp,
            cell=cell,
            iq=iq,
            qa=qa,
            valid=valid,
            exp=e,
            fx=(np.asarray(chunk.x, dtype=np.float64) + 0.5) / self.quad_nx - 0.5,
            fy=(np.asarray(chunk.y, dtype=np.float64) + 0.5) / self.quad_ny - 0.5,
        )


@dataclass(frozen=True)
class _Indexed:
    star: np.ndarray
    zp: np.ndarray
    cell: np.ndarray
    iq: np.ndarray
    qa: np.ndarray
    valid: np.ndarray
    exp: np.ndarray  # exposure row
    fx: np.ndarray  # x / quad_nx - 0.5: lever arm of the gradient term
    fy: np.ndarray


def build_layout(
    source: ObservationSource,
    *,
    quad_nx: int,
    quad_ny: int,
    reference: ReferenceStars | None = None,
    options: UbercalOptions | None = None,
) -> UbercalLayout:
    """Collect the exposures, quadrants and stars of ``source`` (one pass), and
    size the model to the data where the options leave it to ``'auto'`` (one
    more pass, :mod:`calib.ubercal.sizing`).

    Parameters
    ----------
    source : ObservationSource
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size (for the starflat cells).
    reference : ReferenceStars, optional
        Anchor magnitudes and colours.
    options : UbercalOptions, optional

    Raises
    ------
    UbercalError
        If ``source`` holds no observation.
    """
    opts = options or UbercalOptions()
    if quad_nx < 1 or quad_ny < 1:
        raise ValueError(f"quad_nx and quad_ny must be positive, got {quad_nx}, {quad_ny}")
    ids = source.map_reduce(_chunk_ids)
    if not (len(ids.expid) and len(ids.source_id)):
        raise UbercalError(
            "observations: none to fit (no observation names an exposure, a quadrant and a star)"
        )
    opts, sizing = size_model(source, ids, quad_nx=quad_nx, quad_ny=quad_ny, options=opts)
    n = len(ids.source_id)
    ref_mag = np.full(n, np.nan)
    ref_err = np.full(n, np.nan)
    ref_col = np.full(n, np.nan)
    if reference is not None:
        order = np.argsort(reference.source_id)
        rid = np.asarray(reference.source_id)[order]
        pos = _lookup(rid, ids.source_id)
        hit = pos >= 0
        ref_mag[hit] = np.asarray(reference.mag)[order][pos[hit]]
        ref_err[hit] = np.asarray(reference.mag_err)[order][pos[hit]]
        ref_col[hit] = np.asarray(reference.bp_rp)[order][pos[hit]]
    if opts.colour_term and not np.isfinite(ref_col).any():
        raise ValueError("reference: colour_term needs bp_rp colours for the observed stars")
    colour = np.where(np.isfinite(ref_col), ref_col - opts.colour_pivot, 0.0)
    return UbercalLayout(
        expids=ids.expid.astype(np.int64),
        quadrants=ids.quadrant.astype(np.int64),
        source_ids=ids.source_id.astype(np.int64),
        colour=colour,
        ref_mag=ref_mag,
        ref_mag_err=ref_err,
        ref_bp_rp=ref_col,
        quad_nx=int(quad_nx),
        quad_ny=int(quad_ny),
        options=opts,
        sizing=sizing,
    )
