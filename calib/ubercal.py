"""Ubercal: one global weighted least-squares fit of star magnitudes, zero points
and starflats over many exposures (BRIEF §1 step 5; seed 004; docs/ubercal.md).

Model, for observation ``o`` of star ``s`` on quadrant ``q`` of exposure ``e`` at
data-section position ``(x, y)`` in superpixel cell ``c(x, y)``::

    m_inst(o) = m_s - zp(e[, q]) - dzp(q, c) - k_q (bp_rp_s - pivot)
                - g_x(e) (x / nx - 1/2) - g_y(e) (y / ny - 1/2)

so that ``m = m_inst + zp + dzp (+ colour and gradient terms)`` (docs/simulator.md).
Zero points are per exposure or per exposure-quadrant; ``dzp`` is the starflat
(:class:`calib.starflat.Starflat`); ``k_q`` an optional per-quadrant colour term;
``g`` an optional per-exposure gradient (cloud and differential-airmass gradients).
Each observation has weight ``1 / (mag_inst_err^2 + floor^2)``.

Solver. The normal equations are summed over chunks of observations
(:class:`NormalEquations` adds; an :class:`ObservationSource` maps a function over
chunks wherever they live), so the observation table never has to sit in one
process. The star block is diagonal: star magnitudes are eliminated analytically
and the reduced (Schur complement) system -- a weighted graph Laplacian of zero
points with a dense border of cells, gradients and colour terms -- is factorised
by dense Cholesky up to ``dense_max_params`` unknowns, else by sparse LU (SuperLU,
symmetric mode, minimum-degree ordering, which puts the dense border last). Outlier
passes update the Schur complement for the stars whose observations changed only.

Gauge (:class:`UbercalOptions` ``anchor``): by default the reference catalog
enters as a prior on the star magnitudes, which fixes the global offset and the
large-scale modes (a sky gradient trades against a starflat gradient); or a pure
relative fit is shifted by the clipped mean of ``m_ref - m_s``. Each quadrant's
starflat cells average to zero (per exposure-quadrant zero points; the whole focal
plane's with per-exposure zero points), colour terms average to zero over
quadrants. Exact modes are removed in the factorisation by holding their
best-constrained parameter at zero; the shifts to the stated gauge are applied
afterwards and leave every residual unchanged. Disconnected parts of the
observation graph raise :class:`DisconnectedGraphError`.

Errors are the diagonal of the covariance in the final gauge: exact on the dense
path, from ``error_samples`` random draws of ``S^-1`` on the sparse path.

Outliers: each pass clips observations whose residual, normalised by its error
and its leverage on the star magnitude, exceeds ``clip_sigma``, and rejects for
good the stars whose chi2 (clipped observations included, the largest term
forgiven) is ``star_clip_sigma`` above its expectation: variable stars. Passes
stop when the selection is stable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, cast

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph
import scipy.sparse.linalg

from calib.starflat import Starflat, cell_index

__all__ = [
    "DisconnectedGraphError",
    "FitStatistics",
    "InMemoryObservations",
    "NormalEquations",
    "ObservationChunk",
    "ObservationSource",
    "ReferenceStars",
    "UbercalError",
    "UbercalLayout",
    "UbercalOptions",
    "UbercalQA",
    "UbercalSolution",
    "accumulate_normal_equations",
    "build_layout",
    "solve_ubercal",
]

T = TypeVar("T")

# Weights are >= 1/mag^2 for any real error; sums that cancel leave ~1e-12.
_PRUNE_WEIGHT = 1e-8
_QA_HIST_HALF_RANGE_MAG = 0.1
_QA_HIST_BINS = 400
_QA_MAX_ERR_MAG = 0.05
_REPEATABILITY_BINS_MAG = np.arange(12.0, 22.01, 0.5)


class UbercalError(RuntimeError):
    """The ubercal system cannot be solved as posed."""


class DisconnectedGraphError(UbercalError):
    """The observation graph falls apart into groups of exposures that share no
    star; their relative zero points are unconstrained.

    Attributes
    ----------
    components : list of (ndarray, ndarray)
        Per component, largest first: the ``(expid, quadrant)`` of its zero-point
        parameters (quadrant is -1 for per-exposure zero points).
    """

    def __init__(self, components: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.components = components
        sizes = [len(e) for e, _ in components]
        lines = []
        for k, (e, q) in enumerate(components[:10]):
            exps = np.unique(e)
            shown = ", ".join(str(x) for x in exps[:8]) + (" ..." if len(exps) > 8 else "")
            quads = np.unique(q[q >= 0])
            lines.append(
                f"  component {k}: {len(e)} zero points, {len(exps)} exposures [{shown}]"
                + (f", quadrants {quads.tolist()}" if len(quads) else "")
            )
        super().__init__(
            f"observation graph has {len(components)} disconnected components "
            f"(zero points per component: {sizes}); their relative zero points are not "
            "constrained by any star. Solve them separately or add overlapping "
            "observations.\n" + "\n".join(lines)
        )

    def __reduce__(self) -> tuple[type, tuple[list[tuple[np.ndarray, np.ndarray]]]]:
        # Dask ships a task's exception back to the client by pickling it; the
        # default would call __init__ with the message instead of the components.
        return (type(self), (self.components,))


@dataclass(frozen=True, kw_only=True)
class UbercalOptions:
    """Options of the ubercal fit.

    Attributes
    ----------
    zp_mode : {'exposure_quadrant', 'exposure'}
        One zero point per exposure and quadrant, or one per exposure.
    starflat : bool
        Fit a starflat (delta-zp per superpixel cell of each quadrant).
    cells : (int, int)
        Starflat grid per quadrant, (ncy, ncx).
    colour_term : bool
        Fit a per-quadrant colour term ``k_q (bp_rp - colour_pivot)``; needs a
        reference catalog with ``bp_rp``.
    colour_pivot : float, mag
        Colour at which the colour term vanishes.
    exposure_gradient : bool
        Fit a linear zero-point gradient per exposure, the same within every
        quadrant: ``g_x (x / quad_nx - 0.5) + g_y (y / quad_ny - 0.5)`` [mag]
        (grey clouds and differential airmass vary across the focal plane; the
        quadrant-to-quadrant part lives in the per exposure-quadrant zero points).
        Assumes the quadrants' pixel axes are parallel to the mosaic's. The mean
        gradient over exposures and the starflat's gradient are told apart only
        by the variation within cells, so that combination is weakly determined;
        zero points, which it does not enter, are not affected.
    error_floor_mag : float, mag
        Added in quadrature to every ``mag_inst_err``.
    clip_sigma : float
        Observations whose normalised residual exceeds this are clipped.
    star_clip_sigma : float
        Stars whose chi2 is this many sigma (normal equivalent) above its
        expectation are rejected (variable stars).
    max_iterations : int
        Maximum solve passes (the first has no clipping).
    clip_tolerance : float
        The clipping is stable when at most this fraction of the usable
        observations changed side in the last pass (a few flip back and forth
        across the threshold forever) and no star was newly rejected.
    solver : {'auto', 'dense', 'sparse'}
        Factorisation of the reduced system: dense Cholesky, sparse LU, or dense
        up to ``dense_max_params`` unknowns and sparse above.
    dense_max_params : int
        Largest reduced system solved densely by ``'auto'``.
    anchor : {'prior', 'offset'}
        How the reference catalog fixes the gauge. ``'prior'``: every reference
        star of the anchor colour range enters the fit as an observation of its
        own magnitude, ``m_s = m_ref + a (bp_rp - pivot)`` (one fitted colour
        coefficient ``a``), with error ``sqrt(ref_err^2 + anchor_scatter^2)``;
        this fixes the global offset and also the large-scale modes (sky
        gradients) that the data leave almost free, because a sky gradient is
        nearly degenerate with a starflat gradient. ``'offset'``: a pure relative
        fit, shifted afterwards by the clipped weighted mean of ``m_ref - m_s``.
    anchor_scatter_mag : float, mag
        Systematic scatter of the reference magnitudes about the natural system
        (colour-term mismatch, catalog systematics) for ``anchor='prior'``.
    anchor_bp_rp_range : (float, float), mag
        Colours of the reference stars used for the anchor.
    anchor_max_obs_err_mag : float, mag
        Only stars whose typical observation error ``sqrt(n_obs / sum w)``, the
        error floor taken out in quadrature, is at most this anchor the solution. Faint stars'
        instrumental magnitudes carry the photometry's additive biases (light of
        undetected sources in the aperture: a fixed number of electrons, so a
        bias that grows as the flux falls); letting thousands of them vote on the
        global level moved it by 7 mmag on the ``small`` preset (docs/ubercal.md).
        0.02 mag is S/N ~ 55.
    anchor_clip_sigma : float
        Clipping of ``m_ref - m_s`` in the anchor.
    error_samples : int
        Random draws used to estimate errors where they are not computed exactly
        (all parameters on the sparse path; the zero-point part of star errors).
    chunk_size : int
        Observations per chunk when the input is one in-memory table.
    qa_cells : (int, int)
        Grid (ny, nx) per quadrant of the median residual maps.
    compute_errors : bool
        Compute the errors (covariance); without them every ``*_err`` is NaN
        (for timing the bare solve).
    threads : int
        Threads for the sparse product that forms the Schur complement.
    seed : int
        Seed of the error sampling.
    """

    zp_mode: Literal["exposure_quadrant", "exposure"] = "exposure_quadrant"
    starflat: bool = True
    cells: tuple[int, int] = (10, 10)
    colour_term: bool = False
    colour_pivot: float = 1.0
    exposure_gradient: bool = True
    error_floor_mag: float = 0.005
    clip_sigma: float = 5.0
    star_clip_sigma: float = 5.0
    max_iterations: int = 10
    clip_tolerance: float = 1e-5
    solver: Literal["auto", "dense", "sparse"] = "auto"
    dense_max_params: int = 8000
    anchor: Literal["prior", "offset"] = "prior"
    anchor_scatter_mag: float = 0.01
    anchor_bp_rp_range: tuple[float, float] = (0.5, 1.5)
    anchor_max_obs_err_mag: float = 0.02
    anchor_clip_sigma: float = 3.0
    error_samples: int = 64
    chunk_size: int = 2_000_000
    qa_cells: tuple[int, int] = (20, 20)
    compute_errors: bool = True
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.zp_mode not in ("exposure_quadrant", "exposure"):
            raise ValueError(
                f"zp_mode must be 'exposure_quadrant' or 'exposure', got {self.zp_mode!r}"
            )
        if self.solver not in ("auto", "dense", "sparse"):
            raise ValueError(f"solver must be 'auto', 'dense' or 'sparse', got {self.solver!r}")
        for name in ("cells", "qa_cells"):
            v = getattr(self, name)
            if len(v) != 2 or min(v) < 1:
                raise ValueError(f"{name} must be two positive integers (ny, nx), got {v!r}")
        if self.anchor not in ("prior", "offset"):
            raise ValueError(f"anchor must be 'prior' or 'offset', got {self.anchor!r}")
        for name in ("error_floor_mag", "clip_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "clip_sigma",
            "star_clip_sigma",
            "anchor_clip_sigma",
            "anchor_scatter_mag",
            "anchor_max_obs_err_mag",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_iterations",
            "error_samples",
            "chunk_size",
            "dense_max_params",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes: object) -> UbercalOptions:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ObservationChunk:
    """Observations of reference stars, as in a night catalog (docs/store.md).

    Attributes
    ----------
    expid, quadrant, source_id : ndarray, shape (n,), int64
    x, y : ndarray, shape (n,), pixels
        0-based data-section position of the star on its quadrant.
    mag_inst, mag_inst_err : ndarray, shape (n,), mag
        ``-2.5 log10(flux_e / EXPTIME)`` and its error.
    flags : ndarray, shape (n,), int, optional
        0 = good; anything else is ignored by the fit.
    """

    expid: np.ndarray
    quadrant: np.ndarray
    source_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    mag_inst: np.ndarray
    mag_inst_err: np.ndarray
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.expid)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if np.ndim(v) != 1 or len(v) != n:
                raise ValueError(
                    f"{f.name} must be one-dimensional with the length of expid ({n}), "
                    f"got shape {np.shape(v)}"
                )

    def __len__(self) -> int:
        return len(self.expid)

    @classmethod
    def from_mapping(
        cls, columns: dict, rows: np.ndarray | slice = slice(None)
    ) -> ObservationChunk:
        """Take the named columns (e.g. a night catalog's variables) at ``rows``."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n != "flags" and n not in columns]
        if missing:
            raise ValueError(f"columns: missing {missing}")
        return cls(**{n: np.asarray(columns[n])[rows] for n in names if n in columns})

    def split(self, size: int) -> list[ObservationChunk]:
        """Consecutive pieces of at most ``size`` observations."""
        return [self.take(slice(i, i + size)) for i in range(0, max(len(self), 1), size)]

    def take(self, rows: np.ndarray | slice) -> ObservationChunk:
        """The observations at ``rows``."""
        return ObservationChunk(
            expid=self.expid[rows],
            quadrant=self.quadrant[rows],
            source_id=self.source_id[rows],
            x=self.x[rows],
            y=self.y[rows],
            mag_inst=self.mag_inst[rows],
            mag_inst_err=self.mag_inst_err[rows],
            flags=None if self.flags is None else self.flags[rows],
        )


class ObservationSource(Protocol):
    """Where the observations live. ``map_reduce(fn)`` applies ``fn`` to every
    chunk of observations (in any process) and returns the sum (``+``) of the
    results; it may be called several times (one pass per outlier iteration)."""

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T: ...


@dataclass(frozen=True)
class InMemoryObservations:
    """An :class:`ObservationSource` over chunks held in this process."""

    chunks: Sequence[ObservationChunk | _Prepared]

    def map_reduce(self, fn: Callable[[ObservationChunk], T]) -> T:
        # Chunks indexed once by solve_ubercal (_Prepared) are taken by the pass
        # functions as they are.
        return functools.reduce(operator.add, (fn(c) for c in self.chunks))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ReferenceStars:
    """Reference-catalog magnitudes in the fitted band.

    Attributes
    ----------
    source_id : ndarray, shape (n_ref,), int64
    mag, mag_err : ndarray, shape (n_ref,), mag
        NaN where the catalog has none.
    bp_rp : ndarray, shape (n_ref,), mag
        Colour; NaN where missing.
    """

    source_id: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    bp_rp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.source_id)
        for name in ("mag", "mag_err", "bp_rp"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name} must have shape ({n},) like source_id")


@dataclass(frozen=True)
class _Ids:
    expid: np.ndarray
    quadrant: np.ndarray
    source_id: np.ndarray

    def __add__(self, other: _Ids) -> _Ids:
        return _Ids(
            *(_unique(np.concatenate((a, b))) for a, b in zip(self.ids, other.ids, strict=True))
        )

    @property
    def ids(self) -> tuple[np.ndarray, ...]:
        return self.expid, self.quadrant, self.source_id


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values; a plain sort is several times faster than
    ``np.unique``'s hashing on millions of int64 identifiers."""
    v = np.sort(np.asarray(values, dtype=np.int64))
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


def _chunk_ids(chunk: ObservationChunk) -> _Ids:
    return _Ids(_unique(chunk.expid), _unique(chunk.quadrant), _unique(chunk.source_id))


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
        return self.options.cells[0] * self.options.cells[1]

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

    def anchor_stars(self, star_n: np.ndarray, star_w: np.ndarray) -> np.ndarray:
        """Stars that tie the solution to the reference catalog: observed, with a
        reference magnitude, a colour in ``anchor_bp_rp_range`` and observations
        precise to ``anchor_max_obs_err_mag`` (from the data's ``star_n`` and
        ``sum w``, which includes the error floor), shape (n_star,) bool."""
        opt = self.options
        lo, hi = opt.anchor_bp_rp_range
        with np.errstate(invalid="ignore", divide="ignore"):
            use = (star_n > 0) & np.isfinite(self.ref_mag) & (self.ref_bp_rp >= lo)
            use &= self.ref_bp_rp <= hi
            use &= star_n <= star_w * (opt.anchor_max_obs_err_mag**2 + opt.error_floor_mag**2)
        return use

    def prior_equations(self, star_n: np.ndarray, anchor: np.ndarray) -> NormalEquations:
        """The reference catalog as observations of the star magnitudes,
        ``m_s - a (bp_rp_s - pivot) = m_ref_s`` with weight
        ``1 / (ref_err^2 + anchor_scatter^2)``, for the ``anchor`` stars (see
        :meth:`anchor_stars`) that still have data (``star_n > 0``); ``a`` (the
        colour term between the natural and the reference systems) is the last
        parameter."""
        opt = self.options
        use = anchor & (star_n > 0)
        w = np.where(
            use, 1.0 / (np.nan_to_num(self.ref_mag_err) ** 2 + opt.anchor_scatter_mag**2), 0.0
        )
        col = np.where(use, self.ref_bp_rp - opt.colour_pivot, 0.0)
        m_ref = np.where(use, self.ref_mag, 0.0)
        a = self.n_param - 1
        stars = np.flatnonzero(use)
        npp, ns = self.n_param, self.n_star
        return NormalEquations(
            star_w=w,
            star_b=w * m_ref,
            app=sp.csr_matrix(([np.sum(w * col * col)], ([a], [a])), shape=(npp, npp)),
            aps=sp.csc_matrix(
                (-(w * col)[stars], (np.full(len(stars), a), stars)), shape=(npp, ns)
            ),
            bp=np.bincount([a], weights=[-np.sum(w * col * m_ref)], minlength=npp),
            star_n=np.zeros(ns, dtype=np.int64),
        )

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
            chunk.x, chunk.y, quad_nx=self.quad_nx, quad_ny=self.quad_ny, cells=self.options.cells
        )
        cell = iq * self.n_cell_per_q + cy * self.options.cells[1] + cx
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


def _lookup(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, values)
    pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
    if not len(sorted_ids):
        return np.full(len(values), -1, dtype=np.int64)
    return np.where(sorted_ids[pos] == values, pos, -1).astype(np.int64)


def build_layout(
    source: ObservationSource,
    *,
    quad_nx: int,
    quad_ny: int,
    reference: ReferenceStars | None = None,
    options: UbercalOptions | None = None,
) -> UbercalLayout:
    """Collect the exposures, quadrants and stars of ``source`` (one pass).

    Parameters
    ----------
    source : ObservationSource
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size (for the starflat cells).
    reference : ReferenceStars, optional
        Anchor magnitudes and colours.
    options : UbercalOptions, optional
    """
    opts = options or UbercalOptions()
    if quad_nx < 1 or quad_ny < 1:
        raise ValueError(f"quad_nx and quad_ny must be positive, got {quad_nx}, {quad_ny}")
    ids = source.map_reduce(_chunk_ids)
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
    )


@dataclass(frozen=True)
class _Parameters:
    """A solution in parameter space, for computing residuals."""

    p: np.ndarray  # (n_param,), NaN where unconstrained
    star_mag: np.ndarray  # (n_star,), NaN where not solved
    star_weight: np.ndarray  # (n_star,) 1/mag^2, sum of weights of used observations


@dataclass(frozen=True)
class _PassState:
    """What a pass needs to rebuild the previous pass's selection and make its own."""

    current: _Parameters | None
    previous: _Parameters | None
    star_rejected: np.ndarray  # (n_star,) bool, for this pass
    star_rejected_before: np.ndarray  # (n_star,) bool, as the previous pass had it
    # The last pass the iteration allows: no solve follows, so the change of the
    # normal equations is not needed (statistics only).
    final: bool = False


@dataclass(frozen=True)
class _Prepared:
    """A chunk mapped to parameter indices, with weights (computed once per chunk)."""

    ix: _Indexed
    mag: np.ndarray  # (n,) mag_inst
    w: np.ndarray  # (n,) 1 / (err^2 + floor^2), 0 for unusable observations
    good: np.ndarray  # (n,) bool: flags 0, finite, known identifiers
    n_obs: int
    order: np.ndarray  # (n,) the chunk's row of each prepared observation
    # The last pass's selection, keyed by the identity of the solution and the
    # rejected-star set it was made under: an in-memory chunk then need not
    # rebuild it in the next pass (a chunk read afresh simply recomputes it).
    last_used: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def _prepare(chunk: ObservationChunk | _Prepared, layout: UbercalLayout) -> _Prepared:
    """Index a chunk and order its observations by star: the coupling block of
    any subset is then built column by column, without a sparse conversion."""
    if isinstance(chunk, _Prepared):
        return chunk
    ix = layout.index(chunk)
    order = np.argsort(ix.star, kind="stable")
    ix = _Indexed(**{f.name: getattr(ix, f.name)[order] for f in dataclasses.fields(ix)})
    err = np.asarray(chunk.mag_inst_err, dtype=np.float64)[order]
    mag = np.asarray(chunk.mag_inst, dtype=np.float64)[order]
    good = ix.valid & np.isfinite(mag) & np.isfinite(err) & (err > 0)
    if chunk.flags is not None:
        good &= np.asarray(chunk.flags)[order] == 0
    safe_err = np.where(good, err, 1.0)
    w = np.where(good, 1.0 / (safe_err**2 + layout.options.error_floor_mag**2), 0.0)
    return _Prepared(ix=ix, mag=mag, w=w, good=good, n_obs=len(chunk), order=order)


@dataclass(frozen=True)
class NormalEquations:
    """Normal equations of a set of observations; ``a + b`` and ``a - b`` combine them.

    Attributes
    ----------
    star_w, star_b : ndarray, shape (n_star,)
        Diagonal star block ``sum w`` and right-hand side ``sum w m_inst``.
    app : scipy.sparse.csr_matrix, shape (n_param, n_param)
        Parameter block ``J_p^T W J_p``.
    aps : scipy.sparse.csc_matrix, shape (n_param, n_star)
        Coupling block ``J_p^T W J_s``.
    bp : ndarray, shape (n_param,)
        ``J_p^T W m_inst``.
    star_n : ndarray, shape (n_star,), int64
        Observations per star.
    """

    star_w: np.ndarray
    star_b: np.ndarray
    app: sp.csr_matrix
    aps: sp.csc_matrix
    bp: np.ndarray
    star_n: np.ndarray

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(
            star_w=self.star_w + other.star_w,
            star_b=self.star_b + other.star_b,
            app=(self.app + other.app).tocsr(),
            aps=(self.aps + other.aps).tocsc(),
            bp=self.bp + other.bp,
            star_n=self.star_n + other.star_n,
        )

    def __sub__(self, other: NormalEquations) -> NormalEquations:
        return self + other.scaled(-1.0)

    def scaled(self, factor: float) -> NormalEquations:
        return NormalEquations(
            star_w=factor * self.star_w,
            star_b=factor * self.star_b,
            app=factor * self.app,
            aps=factor * self.aps,
            bp=factor * self.bp,
            star_n=(factor * self.star_n).astype(np.int64),
        )

    def pruned(self, stars: np.ndarray) -> NormalEquations:
        """Exact zeros where observations were added and removed again: a star
        without observations gets no weight (not a rounding residue, whose inverse
        would be huge), and cancelled couplings no longer link the graph.

        Prunes these matrices *in place* (use it on a fresh sum): all of the
        parameter block, and of the coupling block -- the largest array of the
        solve -- only the columns of ``stars``, the ones a change touched, whose
        residues are set to zero without compacting the matrix."""
        none = self.star_n == 0
        app, aps = self.app, self.aps
        app.data[np.abs(app.data) < _PRUNE_WEIGHT] = 0.0
        app.eliminate_zeros()
        start, stop = aps.indptr[stars], aps.indptr[stars + 1]
        k = np.repeat(start - np.cumsum(np.concatenate(([0], stop - start)))[:-1], stop - start)
        k += np.arange(len(k))
        aps.data[k[np.abs(aps.data[k]) < _PRUNE_WEIGHT]] = 0.0
        return dataclasses.replace(
            self,
            star_w=np.where(none, 0.0, self.star_w),
            star_b=np.where(none, 0.0, self.star_b),
        )


def accumulate_normal_equations(
    chunk: ObservationChunk, layout: UbercalLayout, *, use: np.ndarray | None = None
) -> NormalEquations:
    """Normal equations of the usable observations of one chunk.

    Parameters
    ----------
    chunk : ObservationChunk
    layout : UbercalLayout
    use : ndarray of bool, shape (n,), optional
        Observations to include (default: all usable ones: flags 0, finite,
        known identifiers).

    Returns
    -------
    NormalEquations
        Summable over chunks: the equations of a table are the sum of its chunks'.
    """
    prep = _prepare(chunk, layout)
    sel = prep.good if use is None else prep.good & np.asarray(use)[prep.order]
    return _normal_equations(prep, layout, np.flatnonzero(sel))


def _normal_equations(prep: _Prepared, layout: UbercalLayout, k: np.ndarray) -> NormalEquations:
    """Equations of observations ``k`` (ascending) of a prepared chunk."""
    opt = layout.options
    ix = prep.ix
    s, wk, yk = ix.star[k], prep.w[k], prep.mag[k]
    n_exp = len(layout.expids)
    # Each model term: (first parameter of its block, block size, index within
    # the block per observation, d(model)/d(parameter) per observation).
    terms: list[tuple[int, int, np.ndarray, np.ndarray | float]] = [
        (0, layout.n_zp, ix.zp[k], -1.0)
    ]
    if opt.starflat:
        terms.append((layout.n_zp, layout.n_cell, ix.cell[k], -1.0))
    if opt.colour_term:
        terms.append((layout.colour_slice.start, layout.n_q, ix.iq[k], -layout.colour[s]))
    if opt.exposure_gradient:
        g = 2 * ix.exp[k]
        terms.append((layout.gradient_start, 2 * n_exp, g, -ix.fx[k]))
        terms.append((layout.gradient_start, 2 * n_exp, g + 1, -ix.fy[k]))
    npp, ns, m, n = layout.n_param, layout.n_star, len(terms), len(k)
    # One row per observation, its m parameters side by side.
    idx = np.empty((n, m), dtype=np.int64)
    wval = np.empty((n, m))
    for j, (start, _, local, coef) in enumerate(terms):
        idx[:, j] = start + local
        wval[:, j] = coef
    wval *= wk[:, None]
    star_n = np.bincount(s, minlength=ns)
    # Observations come grouped by star (_prepare sorts them), so the coupling
    # block J_p^T W J_s is these rows with the column pointer moving every star.
    star_ptr = np.concatenate(([0], np.cumsum(star_n) * m))
    return NormalEquations(
        star_w=np.bincount(s, weights=wk, minlength=ns),
        star_b=np.bincount(s, weights=wk * yk, minlength=ns),
        app=_parameter_block(terms, wk, npp),
        aps=sp.csc_matrix((wval.ravel(), idx.ravel(), star_ptr), shape=(npp, ns)),
        bp=np.bincount(idx.ravel(), weights=(wval * yk[:, None]).ravel(), minlength=npp),
        star_n=star_n.astype(np.int64),
    )


def _parameter_block(
    terms: list[tuple[int, int, np.ndarray, np.ndarray | float]], w: np.ndarray, npp: int
) -> sp.csr_matrix:
    """``A_pp = J_p^T W J_p`` term pair by term pair: each pair's sums are keyed by
    (index in one block, index in the other) and summed with a bincount, instead
    of a general sparse product (3x slower: it sorts every row's entries)."""
    rows, cols, vals = [], [], []
    for j, (start_j, size_j, li, ci) in enumerate(terms):
        for start_l, size_l, ll, cl in terms[j:]:
            if ll is li:
                rows.append(start_j + np.arange(size_j))
                cols.append(rows[-1])
                vals.append(np.bincount(li, weights=w * ci * ci, minlength=size_j))
                continue
            a, b, v = _pair_sums(li, size_j, ll, size_l, w * ci * cl)
            rows += [start_j + a, start_l + b]
            cols += [start_l + b, start_j + a]
            vals += [v, v]
    app = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(npp, npp)
    )
    app.eliminate_zeros()
    return app


def _pair_sums(
    a: np.ndarray, na: int, b: np.ndarray, nb: int, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of ``v`` per distinct pair ``(a, b)``, ``0 <= a < na``, ``0 <= b < nb``."""
    key = a * nb + b
    if na * nb <= max(4 * len(key), 1 << 22):
        sums = np.bincount(key, weights=v, minlength=na * nb)
        hit = np.flatnonzero(sums)
        return hit // nb, hit % nb, sums[hit]
    if not len(key):
        return key, key, v[:0]
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    uk = key[first]
    return uk // nb, uk % nb, np.add.reduceat(v[order], first)


@dataclass(frozen=True)
class _PassStatistics:
    """Residual statistics of a pass: per star over its usable observations
    (clipped ones included: ``star_*_all``, for the variability test) and over the
    used ones (repeatability), plus QA histograms. Sums, except ``star_max*``
    (the observation with the largest ``w r^2``: the one a star may lose)."""

    star_w_all: np.ndarray  # (n_star,) sum w
    star_wr_all: np.ndarray  # (n_star,) sum w r
    star_chi2_all: np.ndarray  # (n_star,) sum w r^2
    star_n_all: np.ndarray  # (n_star,) count
    star_max: np.ndarray  # (n_star,) largest w r^2
    star_max_w: np.ndarray  # (n_star,) w of that observation
    star_max_wr: np.ndarray  # (n_star,) w r of that observation
    star_r1: np.ndarray  # (n_star,) sum r over used observations
    star_r2: np.ndarray  # (n_star,) sum r^2 over used observations
    star_nobs: np.ndarray  # (n_star,) observations used
    qa_hist: np.ndarray  # (n_q * qa_ny * qa_nx, n_bins) residual histograms
    counts: dict[str, float]

    def __add__(self, other: _PassStatistics) -> _PassStatistics:
        summed = {f: getattr(self, f) + getattr(other, f) for f in _STAT_SUMS}
        theirs = other.star_max > self.star_max
        return _PassStatistics(
            **summed,
            star_max=np.where(theirs, other.star_max, self.star_max),
            star_max_w=np.where(theirs, other.star_max_w, self.star_max_w),
            star_max_wr=np.where(theirs, other.star_max_wr, self.star_max_wr),
            counts={k: self.counts[k] + other.counts[k] for k in self.counts},
        )


_STAT_SUMS = (
    "star_w_all",
    "star_wr_all",
    "star_chi2_all",
    "star_n_all",
    "star_r1",
    "star_r2",
    "star_nobs",
    "qa_hist",
)


@dataclass(frozen=True)
class _PassResult:
    """One pass over a chunk: the change of the normal equations since the
    previous pass's selection, and the statistics of this pass's selection."""

    delta: NormalEquations | None  # None in a final pass
    stats: _PassStatistics

    def __add__(self, other: _PassResult) -> _PassResult:
        delta = None if self.delta is None or other.delta is None else self.delta + other.delta
        return _PassResult(delta, self.stats + other.stats)


def _model_residual(params: _Parameters, prep: _Prepared, layout: UbercalLayout) -> np.ndarray:
    """``m_inst - (m_s - zp - dzp - k colour)`` (NaN for unusable observations)."""
    ix = prep.ix
    s = np.where(prep.good, ix.star, 0)
    pred = params.star_mag[s] - params.p[np.where(prep.good, ix.zp, 0)]
    if layout.options.starflat:
        pred -= params.p[layout.n_zp + np.where(prep.good, ix.cell, 0)]
    if layout.options.colour_term:
        colour_p = params.p[layout.n_zp + layout.n_cell + np.where(prep.good, ix.iq, 0)]
        pred -= colour_p * layout.colour[s]
    if layout.options.exposure_gradient:
        g = layout.gradient_start + 2 * np.where(prep.good, ix.exp, 0)
        pred -= params.p[g] * ix.fx + params.p[g + 1] * ix.fy
    return np.where(prep.good, prep.mag - pred, np.nan)


def _selected(
    prep: _Prepared, layout: UbercalLayout, params: _Parameters | None, rejected: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(used, clipped, residual) under a solution and a set of rejected stars."""
    star_ok = ~rejected[np.where(prep.good, prep.ix.star, 0)]
    if params is None:
        n = len(prep.w)
        return prep.good & star_ok, np.zeros(n, dtype=bool), np.full(n, np.nan)
    r = _model_residual(params, prep, layout)
    # The solution does not say which observations it was fitted on, so both
    # normalisations are formed. Fitted, a residual's variance is sigma^2 (1 - h),
    # h = w / W_star its leverage on the star magnitude (without it, stars with 2-3
    # observations would never clip); left out, sigma^2 (1 + h). The second is
    # the smaller |z|, and an observation whose left-out |z| exceeds the threshold
    # is clipped whichever it was. In the band between the two only the star's
    # worst observation (in this chunk) goes: one cosmic-ray hit drags the mean
    # of a few observations far enough to put the good ones past 5 sigma, and
    # clipping them all at once left a star with one observation that the next
    # pass (h = 1) put back, a cycle. Left out, an observation's z equals the one
    # it had when fitted, so what is clipped stays clipped.
    star = np.where(prep.good, prep.ix.star, 0)
    lev = prep.w / np.maximum(params.star_weight[star], 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_in = np.abs(r) * np.sqrt(prep.w / np.clip(1.0 - lev, 1e-3, None))
        z_out = np.abs(r) * np.sqrt(prep.w / (1.0 + lev))
    clip = layout.options.clip_sigma
    cand = prep.good & star_ok & np.isfinite(z_in)
    worst = np.zeros(layout.n_star)
    np.maximum.at(worst, star[cand], z_in[cand])
    # No residual (star or parameter left unsolved by the last clipping): stay out,
    # or the observation would flip back in and out at every pass.
    # Ties within rounding count as the worst: a star's two fitted observations
    # always have the same |z|, and which one is bad cannot be told.
    is_worst = z_in >= worst[star] * (1.0 - 1e-6)
    clipped = prep.good & star_ok & (~(z_out <= clip) | ((z_in > clip) & is_worst))
    return prep.good & star_ok & ~clipped, clipped, r


def _run_pass(
    chunk: ObservationChunk | _Prepared, layout: UbercalLayout, state: _PassState
) -> _PassResult:
    """One pass over a chunk: select observations under ``state.current`` and
    return the change from the previous pass's selection (rebuilt from
    ``state.previous``, so chunks keep no state between passes)."""
    prep = _prepare(chunk, layout)
    opt = layout.options
    used, clipped, r = _selected(prep, layout, state.current, state.star_rejected)
    remembered = prep.last_used.pop((id(state.previous), id(state.star_rejected_before)), None)
    prep.last_used[(id(state.current), id(state.star_rejected))] = used
    ns = layout.n_star
    delta: NormalEquations | None = None
    if state.current is None:
        delta = _normal_equations(prep, layout, np.flatnonzero(used))
        changed = 0
    else:
        before = remembered
        if before is None:
            before, _, _ = _selected(prep, layout, state.previous, state.star_rejected_before)
        if not state.final:
            added = _normal_equations(prep, layout, np.flatnonzero(used & ~before))
            removed = _normal_equations(prep, layout, np.flatnonzero(before & ~used))
            delta = added - removed
        changed = int(np.count_nonzero(used != before))
    k = np.flatnonzero(used)
    s, wk = prep.ix.star[k], prep.w[k]
    nqa = layout.n_q * opt.qa_cells[0] * opt.qa_cells[1]
    zeros = np.zeros(ns)
    stats = _PassStatistics(
        star_w_all=zeros,
        star_wr_all=zeros,
        star_chi2_all=zeros,
        star_n_all=np.zeros(ns, dtype=np.int64),
        star_max=zeros,
        star_max_w=zeros,
        star_max_wr=zeros,
        star_r1=zeros,
        star_r2=zeros,
        star_nobs=np.bincount(s, minlength=ns).astype(np.int64),
        qa_hist=np.zeros((nqa, _QA_HIST_BINS), dtype=np.int64),
        counts={
            "n_obs": float(prep.n_obs),
            "n_good": float(np.count_nonzero(prep.good)),
            "n_used": float(len(k)),
            "n_clipped": float(np.count_nonzero(clipped)),
            "n_changed": float(changed),
            "chi2": 0.0,
        },
    )
    if state.current is not None:
        rk = r[k]
        width = 2 * _QA_HIST_HALF_RANGE_MAG / _QA_HIST_BINS
        sel = np.flatnonzero(wk > _QA_MAX_ERR_MAG**-2)
        b = np.floor((rk[sel] + _QA_HIST_HALF_RANGE_MAG) / width).astype(np.int64)
        b = np.clip(b, 0, _QA_HIST_BINS - 1)
        hist = np.bincount(prep.ix.qa[k][sel] * _QA_HIST_BINS + b, minlength=nqa * _QA_HIST_BINS)
        a = np.flatnonzero((used | clipped) & np.isfinite(r))
        sa, wa, ra = prep.ix.star[a], prep.w[a], r[a]
        chi = wa * ra * ra
        star_max = np.zeros(ns)
        np.maximum.at(star_max, sa, chi)
        # The observation that holds its star's maximum (the first one, on a tie).
        at_max = np.flatnonzero(chi == star_max[sa])
        first = at_max[np.unique(sa[at_max], return_index=True)[1]]
        stats = dataclasses.replace(
            stats,
            star_w_all=np.bincount(sa, weights=wa, minlength=ns),
            star_wr_all=np.bincount(sa, weights=wa * ra, minlength=ns),
            star_chi2_all=np.bincount(sa, weights=wa * ra * ra, minlength=ns),
            star_n_all=np.bincount(sa, minlength=ns).astype(np.int64),
            star_max=star_max,
            star_max_w=np.bincount(sa[first], weights=wa[first], minlength=ns),
            star_max_wr=np.bincount(sa[first], weights=wa[first] * ra[first], minlength=ns),
            star_r1=np.bincount(s, weights=rk, minlength=ns),
            star_r2=np.bincount(s, weights=rk * rk, minlength=ns),
            qa_hist=hist.reshape(nqa, _QA_HIST_BINS),
            counts={**stats.counts, "chi2": float(np.sum(wk * rk * rk))},
        )
    return _PassResult(delta, stats)


@dataclass(frozen=True)
class _Solved:
    ne: NormalEquations  # the equations solved
    S: sp.csr_matrix  # their Schur complement (n_param, n_param)
    params: _Parameters
    active: np.ndarray  # (n_param,) bool: constrained parameters
    free: np.ndarray  # (n_param,) bool: active and not held at zero for the gauge
    method: str
    factor: object  # (L, True) with L the clean lower Cholesky factor, or SuperLU
    n_free: int
    prior_ne: NormalEquations | None  # the reference prior's part of ``ne``


def _inverse_star_weight(star_w: np.ndarray) -> np.ndarray:
    return np.divide(1.0, star_w, out=np.zeros_like(star_w), where=star_w > 0)


def _star_outer(
    ne: NormalEquations, stars: np.ndarray | None = None, *, threads: int = 1
) -> sp.csr_matrix:
    """``A_ps D^-1 A_sp``, over all stars or over a subset's columns.

    The sparse product is the most expensive step of the solve; scipy releases
    the GIL in it, so blocks of rows are multiplied in ``threads`` threads.
    """
    aps = ne.aps if stars is None else ne.aps[:, stars]
    w = ne.star_w if stars is None else ne.star_w[stars]
    scale = np.sqrt(_inverse_star_weight(w))
    # C = A_ps D^-1/2 (CSC); its transpose in CSR shares the arrays.
    data = aps.data * np.repeat(scale, np.diff(aps.indptr))
    CT = sp.csr_matrix((data, aps.indices, aps.indptr), shape=aps.shape[::-1])
    C = CT.T.tocsr()
    if threads <= 1 or C.nnz < 1_000_000:
        return (C @ CT).tocsr()
    edges = np.linspace(0, C.shape[0], threads + 1).astype(int)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda a, b: C[a:b] @ CT, edges[:-1], edges[1:]))
    return sp.vstack(parts, format="csr")


def _schur(
    ne: NormalEquations, prior: _Solved | None, stars: np.ndarray | None, threads: int
) -> sp.csr_matrix:
    """Eliminate the (diagonal) star block: S = A_pp - A_ps D^-1 A_sp.

    After an outlier pass only the stars whose observations changed (``stars``)
    contribute differently, so S is updated from the previous one for them only.
    """
    if prior is None or stars is None:
        return (ne.app - _star_outer(ne, threads=threads)).tocsr()
    new = _star_outer(ne, stars, threads=threads)
    old = _star_outer(prior.ne, stars, threads=threads)
    S = prior.S + (ne.app - prior.ne.app) - new + old
    return S.tocsr()


def _check_connected(S: sp.csr_matrix, layout: UbercalLayout, active: np.ndarray) -> None:
    """Raise DisconnectedGraphError if the zero points fall into separate groups.

    Two zero points share a star exactly when their entry of the Schur complement's
    zero-point block is non-zero (that block of A_pp is diagonal; cells and colour
    terms, which carry no level between groups, are left out). Entries that are
    rounding residues of cancelled couplings do not count.
    """
    nz = layout.n_zp
    Z = S[:nz][:, :nz].tocoo()
    d = np.sqrt(np.abs(S.diagonal()[:nz]))
    link = np.abs(Z.data) > 1e-10 * d[Z.row] * d[Z.col]
    graph = sp.csr_matrix((np.ones(int(link.sum())), (Z.row[link], Z.col[link])), shape=(nz, nz))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    zlab = labels[active[:nz]]
    uniq, counts = np.unique(zlab, return_counts=True)
    if len(uniq) <= 1:
        return
    zp_idx = np.flatnonzero(active[:nz])
    comps = []
    for lab in uniq[np.argsort(-counts, kind="stable")]:
        j = zp_idx[zlab == lab]
        if layout.options.zp_mode == "exposure_quadrant":
            comps.append((layout.expids[j // layout.n_q], layout.quadrants[j % layout.n_q]))
        else:
            comps.append((layout.expids[j], np.full(len(j), -1, dtype=np.int64)))
    raise DisconnectedGraphError(comps)


def _gauge_pins(layout: UbercalLayout, active: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """Parameters held at zero during the factorisation, one per gauge mode."""
    pinned = np.zeros(layout.n_param, dtype=bool)
    score = np.where(active, diag, -np.inf)
    nz, nc = layout.n_zp, layout.n_cell
    if not layout.n_anchor:
        pinned[int(np.argmax(score[:nz]))] = True
    if layout.options.starflat:
        cells = score[nz : nz + nc].reshape(layout.n_q, layout.n_cell_per_q)
        if layout.options.zp_mode == "exposure_quadrant":
            for iq in range(layout.n_q):
                if np.isfinite(cells[iq]).any():
                    pinned[nz + iq * layout.n_cell_per_q + int(np.argmax(cells[iq]))] = True
        else:
            pinned[nz + int(np.argmax(cells.ravel()))] = True
    if layout.options.colour_term:
        pinned[nz + nc + int(np.argmax(score[layout.colour_slice]))] = True
    return pinned & active


def _solve(
    ne: NormalEquations,
    layout: UbercalLayout,
    prior_ne: NormalEquations | None,
    prior: _Solved | None = None,
    changed: NormalEquations | None = None,
) -> _Solved:
    """Solve the equations ``ne`` (the reference prior ``prior_ne`` included);
    with ``prior`` (the previous solve) and ``changed`` (the change of the
    equations since), by updating its Schur complement."""
    opt = layout.options
    stars = None
    if changed is not None:
        stars = np.flatnonzero((np.diff(changed.aps.indptr) > 0) | (changed.star_n != 0))
    S = _schur(ne, prior, stars, opt.threads)
    inv_d = _inverse_star_weight(ne.star_w)
    b = ne.bp - ne.aps @ (ne.star_b * inv_d)
    diag_a = ne.app.diagonal()
    diag_s = S.diagonal()
    # A parameter seen only by stars observed once has A_pp > 0 but S_pp = 0.
    active = (diag_a > 0) & (diag_s > 1e-9 * diag_a)
    if not active[: layout.n_zp].any():
        raise UbercalError("no zero point is constrained: no star is observed twice")
    _check_connected(S, layout, active)
    free = active & ~_gauge_pins(layout, active, diag_s)
    fi = np.flatnonzero(free)
    Sff = S[fi][:, fi]
    use_dense = opt.solver == "dense" or (opt.solver == "auto" and len(fi) <= opt.dense_max_params)
    if use_dense:
        try:
            # A clean triangle (zeros above): the variances invert it in place.
            factor = (
                scipy.linalg.cholesky(
                    Sff.toarray(), lower=True, overwrite_a=True, check_finite=False
                ),
                True,
            )
        except np.linalg.LinAlgError:
            raise _singular_error() from None
        x = scipy.linalg.cho_solve(factor, b[fi], check_finite=False)
        method = "dense-cholesky"
    else:
        factor = scipy.sparse.linalg.splu(
            Sff.tocsc(),
            permc_spec="MMD_AT_PLUS_A",
            diag_pivot_thresh=0.0,
            options={"SymmetricMode": True},
        )
        if np.any(factor.U.diagonal() <= 0):
            raise _singular_error()
        x = factor.solve(b[fi])
        method = "sparse-lu"
    p = np.zeros(layout.n_param)
    p[fi] = x
    p[~active] = np.nan
    star_mag = _back_substitute(ne, p, inv_d, active)
    params = _Parameters(p=p, star_mag=star_mag, star_weight=ne.star_w)
    return _Solved(ne, S, params, active, free, method, factor, len(fi), prior_ne)


def _singular_error() -> UbercalError:
    return UbercalError(
        "the reduced normal matrix is singular: a combination of zero points, starflat "
        "cells or colour terms is not constrained by the data (e.g. starflat cells that "
        "no dithered star links, or a colour term with stars of a single colour). Use "
        "fewer starflat cells, per-exposure zero points, or more dithered exposures."
    )


def _back_substitute(
    ne: NormalEquations, p: np.ndarray, inv_d: np.ndarray, active: np.ndarray
) -> np.ndarray:
    """Star magnitudes ``(b_s - A_sp p) / D_s``; NaN for stars not fitted or tied
    to an unconstrained parameter."""
    p0 = np.where(active, p, 0.0)
    star_mag = (ne.star_b - ne.aps.T @ p0) * inv_d
    ok = inv_d > 0
    if not active.all():
        ok &= (abs(ne.aps).T @ (~active).astype(np.float64)) == 0
    return np.where(ok, star_mag, np.nan)


def _rejected_stars(stats: _PassStatistics, sigma: float) -> np.ndarray:
    """Variable stars: the chi2 of their usable observations but the worst about
    those observations' weighted mean is ``sigma`` above its expectation
    (Wilson-Hilferty normal equivalent, n - 2 degrees of freedom).

    Clipped observations count, or a variable star would lose its extreme points
    to the clipping and pass; the worst one (largest ``w r^2``) is left out of the
    sums *and of the mean*, so that one cosmic-ray hit does not cost its star
    (removing only its own term would leave the mean it dragged, and with five
    observations that alone exceeds 5 sigma). Centring on the mean makes the test
    independent of the star magnitude of the solution the pass used.
    """
    s0 = stats.star_w_all - stats.star_max_w
    s1 = stats.star_wr_all - stats.star_max_wr
    chi2 = stats.star_chi2_all - stats.star_max - s1**2 / np.where(s0 > 0, s0, 1.0)
    dof = stats.star_n_all - 2
    ok = dof >= 1
    k = np.where(ok, dof, 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.cbrt(np.maximum(chi2, 0.0) / k) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))
    return ok & (z > sigma)


def _gauge_transform(
    v: np.ndarray,
    layout: UbercalLayout,
    active: np.ndarray,
    *,
    centre_zp: bool,
    copy: bool = True,
) -> np.ndarray:
    """Apply the gauge shifts to parameter vectors ``v`` (n_param, ...): cells to
    zero mean (per quadrant or per focal plane), the mean moved into the zero
    points; colour terms to zero mean; optionally the mean zero point removed
    (for relative errors). Linear; inactive entries are left as they are.
    ``copy=False`` transforms ``v`` (C-contiguous) in place."""
    if copy:
        v = v.copy()
    nz, nc, nq, npq = layout.n_zp, layout.n_cell, layout.n_q, layout.n_cell_per_q
    opt = layout.options
    tail = v.shape[1:]
    if opt.starflat:
        cells = v[nz : nz + nc].reshape(nq, npq, *tail)
        act = active[nz : nz + nc].reshape(nq, npq)
        actb = act.reshape(nq, npq, *([1] * len(tail)))
        if opt.zp_mode == "exposure_quadrant":
            n = np.maximum(act.sum(axis=1), 1).reshape(nq, *([1] * len(tail)))
            mu = np.where(actb, cells, 0.0).sum(axis=1) / n  # (nq, ...)
            cells -= np.where(actb, mu[:, None], 0.0)
            zp = v[:nz].reshape(-1, nq, *tail)
            zp += mu[None]
        else:
            mu = np.where(actb, cells, 0.0).sum(axis=(0, 1)) / max(act.sum(), 1)
            cells -= np.where(actb, mu, 0.0)
            v[:nz] += mu
    if opt.colour_term:
        col = v[layout.colour_slice]
        act = active[layout.colour_slice].reshape(-1, *([1] * len(tail)))
        col -= np.where(act, np.where(act, col, 0.0).sum(axis=0) / max(act.sum(), 1), 0.0)
    if centre_zp:
        act = active[:nz].reshape(-1, *([1] * len(tail)))
        v[:nz] -= np.where(act, v[:nz], 0.0).sum(axis=0) / max(act.sum(), 1)
    return v


@dataclass(frozen=True)
class FitStatistics:
    """Fit statistics of an ubercal solution.

    Attributes
    ----------
    chi2, dof, chi2_per_dof : float
        Over the observations used in the final solution and, with the
        reference prior, its equations.
    n_obs, n_good, n_used : int
        Observations given, usable (flags 0, finite, known ids), used.
    n_rejected : int
        Usable observations not used: clipped or of rejected stars.
    n_clipped, n_rejected_stars : int
    iterations : int
        Passes over the observations.
    converged : bool
        The clipped set stopped changing before ``max_iterations``.
    solver : str
        ``'dense-cholesky'`` or ``'sparse-lu'``.
    n_params : int
        Unknowns of the reduced system (after gauge pins).
    anchor_offset_mag, anchor_offset_err_mag : float, mag
        Shift applied to tie the relative solution to the reference catalog and
        its error (``anchor='offset'``); with the prior, 0 and the error of the
        mean zero point.
    n_anchor_stars : int
    """

    chi2: float
    dof: int
    chi2_per_dof: float
    n_obs: int
    n_good: int
    n_used: int
    n_rejected: int
    n_clipped: int
    n_rejected_stars: int
    iterations: int
    converged: bool
    solver: str
    n_params: int
    anchor_offset_mag: float
    anchor_offset_err_mag: float
    n_anchor_stars: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class UbercalQA:
    """Quality numbers and maps of a solution.

    Attributes
    ----------
    residual_median_mag : ndarray, shape (n_q, qa_ny, qa_nx), mag
        Median residual (data - model) of well-measured observations per map pixel
        of each quadrant (the slides' "median residuals"); NaN where empty.
    repeatability_mag_bins : ndarray, shape (n_bins + 1,), mag
        Star magnitude bin edges.
    repeatability_median_mag : ndarray, shape (n_bins,), mag
        Median over stars of the rms of their residuals, per magnitude bin.
    repeatability_n_stars : ndarray, shape (n_bins,), int
    """

    residual_median_mag: np.ndarray
    repeatability_mag_bins: np.ndarray
    repeatability_median_mag: np.ndarray
    repeatability_n_stars: np.ndarray


@dataclass(frozen=True)
class UbercalSolution:
    """Result of :func:`solve_ubercal`.

    Attributes
    ----------
    expids : ndarray, shape (n_exp,), int64
    quadrants : ndarray, shape (n_q,), int64
    zp_mag, zp_err_mag : ndarray, shape (n_exp, n_q), mag
        Zero points (``m = m_inst + zp + dzp``) and their relative errors (the mean
        zero point held fixed); NaN where unconstrained. Per-exposure zero points
        repeat along quadrants.
    source_ids : ndarray, shape (n_star,), int64
    star_mag, star_mag_err : ndarray, shape (n_star,), mag
        Calibrated magnitudes (natural system, anchored) and errors; NaN for
        rejected or unconstrained stars.
    star_n_obs : ndarray, shape (n_star,), int64
        Observations used per star.
    star_rms_mag : ndarray, shape (n_star,), mag
        Repeatability: rms of the star's residuals (NaN with < 2 observations).
    star_rejected : ndarray, shape (n_star,), bool
        Rejected as variable.
    starflat : Starflat or None
    colour_term, colour_term_err : ndarray, shape (n_q,) or None
        Per-quadrant colour coefficient [mag per mag of bp_rp].
    stats : FitStatistics
    qa : UbercalQA
    options : UbercalOptions
    """

    expids: np.ndarray
    quadrants: np.ndarray
    zp_mag: np.ndarray
    zp_err_mag: np.ndarray
    source_ids: np.ndarray
    star_mag: np.ndarray
    star_mag_err: np.ndarray
    star_n_obs: np.ndarray
    star_rms_mag: np.ndarray
    star_rejected: np.ndarray
    starflat: Starflat | None
    colour_term: np.ndarray | None
    colour_term_err: np.ndarray | None
    stats: FitStatistics
    qa: UbercalQA
    options: UbercalOptions

    def calibrate(self, chunk: ObservationChunk, *, bp_rp: np.ndarray | None = None) -> np.ndarray:
        """Calibrated magnitudes ``m_inst + zp + dzp (+ k (bp_rp - pivot))`` of
        observations, shape (n,), mag; NaN for unknown exposures or quadrants."""
        e = _lookup(self.expids, chunk.expid)
        q = _lookup(self.quadrants, chunk.quadrant)
        ok = (e >= 0) & (q >= 0)
        m = np.where(ok, chunk.mag_inst + self.zp_mag[np.maximum(e, 0), np.maximum(q, 0)], np.nan)
        if self.starflat is not None:
            m[ok] += self.starflat.evaluate(chunk.quadrant[ok], chunk.x[ok], chunk.y[ok])
        if self.colour_term is not None and bp_rp is not None:
            m[ok] += self.colour_term[q[ok]] * (bp_rp[ok] - self.options.colour_pivot)
        return m


def solve_ubercal(
    observations: ObservationChunk | ObservationSource,
    *,
    quad_nx: int,
    quad_ny: int,
    reference: ReferenceStars | None = None,
    options: UbercalOptions | None = None,
) -> UbercalSolution:
    """Fit zero points, starflat, colour terms and star magnitudes globally.

    Parameters
    ----------
    observations : ObservationChunk or ObservationSource
        One in-memory table (split into ``options.chunk_size`` chunks) or a source
        that maps a function over its chunks wherever they live (e.g. Dask).
    quad_nx, quad_ny : int, pixels
        Quadrant data-section size.
    reference : ReferenceStars, optional
        Reference magnitudes of the band: the anchor of the global gauge (and the
        colours of the colour term). Without it the mean zero point is zero.
    options : UbercalOptions, optional

    Returns
    -------
    UbercalSolution

    Raises
    ------
    DisconnectedGraphError
        If groups of exposures share no star.
    UbercalError
        If the system is otherwise singular, or no reference star is usable.
    """
    opt = options or UbercalOptions()
    if isinstance(observations, ObservationChunk):
        source: ObservationSource = InMemoryObservations(observations.split(opt.chunk_size))
    elif hasattr(observations, "map_reduce"):
        source = observations
    else:
        raise TypeError(
            "observations must be an ObservationChunk or have a map_reduce method, "
            f"got {type(observations).__name__}"
        )
    layout = build_layout(
        source, quad_nx=quad_nx, quad_ny=quad_ny, reference=reference, options=opt
    )
    if isinstance(source, InMemoryObservations):
        # Index once: every outlier pass reuses the mapped identifiers and weights.
        source = InMemoryObservations([_prepare(c, layout) for c in source.chunks])
    return _iterate(source, layout)


def _iterate(source: ObservationSource, layout: UbercalLayout) -> UbercalSolution:
    opt = layout.options
    rejected = before = np.zeros(layout.n_star, dtype=bool)
    current: _Parameters | None = None
    previous: _Parameters | None = None
    solved: _Solved | None = None
    ne: NormalEquations | None = None  # the data's equations and the prior's
    prior_ne: NormalEquations | None = None
    anchor = np.zeros(layout.n_star, dtype=bool)
    converged = False
    passes = 0
    while True:
        final = passes + 1 > opt.max_iterations
        state = _PassState(current, previous, rejected, before, final=final)
        result = source.map_reduce(functools.partial(_run_pass, layout=layout, state=state))
        passes += 1
        stats = result.stats
        newly = np.zeros_like(rejected)
        if solved is not None:
            newly = _rejected_stars(stats, opt.star_clip_sigma) & ~rejected
            changed = stats.counts["n_changed"]
            if not newly.any() and changed <= opt.clip_tolerance * stats.counts["n_good"]:
                if changed and result.delta is not None:
                    # A handful of observations flip across the threshold and back
                    # at every pass: stable. Solve once more to match the selection.
                    ne, prior_ne, change = _updated(ne, prior_ne, result.delta, layout, anchor)
                    solved = _solve(ne, layout, prior_ne, prior=solved, changed=change)
                converged = True
                break
        if final:
            break
        delta = cast(NormalEquations, result.delta)
        if ne is None:
            # The anchor stars are chosen once, from all usable observations: a
            # set that followed the clipping would feed back into it (a star at
            # the error threshold moving in and out at every pass).
            anchor = layout.anchor_stars(delta.star_n, delta.star_w)
            if layout.n_anchor:
                prior_ne = layout.prior_equations(delta.star_n, anchor)
                ne = delta + prior_ne
            else:
                ne = delta
            solved = _solve(ne, layout, prior_ne)
        else:
            ne, prior_ne, change = _updated(ne, prior_ne, delta, layout, anchor)
            solved = _solve(ne, layout, prior_ne, prior=solved, changed=change)
        previous, current = current, solved.params
        before, rejected = rejected, rejected | newly
    if solved is None:
        raise UbercalError("max_iterations left no pass to solve")
    return _finish(stats, solved, layout, rejected, passes, converged)


def _updated(
    ne: NormalEquations | None,
    prior_ne: NormalEquations | None,
    delta: NormalEquations,
    layout: UbercalLayout,
    anchor: np.ndarray,
) -> tuple[NormalEquations, NormalEquations | None, NormalEquations]:
    """The equations after a pass's change ``delta``: (total, prior, change). The
    prior follows the stars that lost or regained all their observations, so only
    small pieces are added before the one sum with the (large) total."""
    total = cast(NormalEquations, ne)
    change = delta
    if prior_ne is not None:
        new_prior = layout.prior_equations(total.star_n + delta.star_n, anchor)
        change = delta + (new_prior - prior_ne)
        prior_ne = new_prior
    touched = np.flatnonzero(np.diff(change.aps.indptr) > 0)
    return (total + change).pruned(touched), prior_ne, change


def _finish(
    stats: _PassStatistics,
    solved: _Solved,
    layout: UbercalLayout,
    rejected: np.ndarray,
    passes: int,
    converged: bool,
) -> UbercalSolution:
    opt = layout.options
    ne = solved.ne
    active = solved.active
    p = _gauge_transform(solved.params.p, layout, active, centre_zp=False)
    star_mag = solved.params.star_mag.copy()
    nz, nc = layout.n_zp, layout.n_cell
    if opt.colour_term:
        # Moving the mean colour term into the star magnitudes keeps every model value.
        shift = p[layout.colour_slice] - solved.params.p[layout.colour_slice]
        star_mag += np.nanmean(shift) * layout.colour
    star_mag = np.where(rejected, np.nan, star_mag)
    if opt.compute_errors:
        p_var, star_var_p, mean_zp_err = _parameter_variances(solved, layout)
    else:
        p_var = np.full(layout.n_param, np.nan)
        star_var_p = np.full(layout.n_star, np.nan)
        mean_zp_err = math.nan
    chi2_prior = 0.0
    if layout.n_anchor:
        offset, offset_err = 0.0, mean_zp_err
        prior = cast(NormalEquations, solved.prior_ne)
        use = prior.star_w > 0
        n_anchor = int(np.count_nonzero(use))
        a = solved.params.p[-1] * (layout.ref_bp_rp[use] - opt.colour_pivot)
        r_ref = solved.params.star_mag[use] - layout.ref_mag[use] - a
        chi2_prior = float(np.nansum(prior.star_w[use] * r_ref**2))
    else:
        offset, offset_err, n_anchor = _anchor(layout, star_mag, ne.star_n, ne.star_w)
    p[:nz] += offset
    star_mag += offset

    inv_d = np.divide(1.0, ne.star_w, out=np.full_like(ne.star_w, np.nan), where=ne.star_w > 0)
    star_err = np.sqrt(inv_d + star_var_p)

    n_exp, nq = len(layout.expids), layout.n_q
    if opt.zp_mode == "exposure_quadrant":
        zp = p[:nz].reshape(n_exp, nq)
        zp_err = np.sqrt(p_var[:nz]).reshape(n_exp, nq)
    else:
        zp = np.repeat(p[:nz, None], nq, axis=1)
        zp_err = np.repeat(np.sqrt(p_var[:nz])[:, None], nq, axis=1)
    starflat = None
    if opt.starflat:
        shape = (nq, *opt.cells)
        starflat = Starflat(
            quadrants=layout.quadrants,
            dzp_mag=p[nz : nz + nc].reshape(shape),
            dzp_err_mag=np.sqrt(p_var[nz : nz + nc]).reshape(shape),
            quad_nx=layout.quad_nx,
            quad_ny=layout.quad_ny,
            gauge="quadrant" if opt.zp_mode == "exposure_quadrant" else "focal_plane",
        )
    colour, colour_err = (
        (p[layout.colour_slice], np.sqrt(p_var[layout.colour_slice]))
        if opt.colour_term
        else (None, None)
    )

    nobs = stats.star_nobs
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.maximum(nobs, 1)
        rms = np.sqrt(
            np.maximum(stats.star_r2 - stats.star_r1**2 / n, 0.0) / np.maximum(nobs - 1, 1)
        )
        rms = np.where(nobs >= 2, rms, np.nan)
    c = stats.counts
    # The reference prior's equations count as observations.
    dof = int(
        c["n_used"] + n_anchor * layout.n_anchor - np.count_nonzero(ne.star_w > 0) - solved.n_free
    )
    chi2 = float(c["chi2"]) + chi2_prior
    fit_stats = FitStatistics(
        chi2=chi2,
        dof=dof,
        chi2_per_dof=chi2 / dof if dof > 0 else math.nan,
        n_obs=int(c["n_obs"]),
        n_good=int(c["n_good"]),
        n_used=int(c["n_used"]),
        n_rejected=int(c["n_good"] - c["n_used"]),
        n_clipped=int(c["n_clipped"]),
        n_rejected_stars=int(rejected.sum()),
        iterations=passes,
        converged=converged,
        solver=solved.method,
        n_params=solved.n_free,
        anchor_offset_mag=float(offset),
        anchor_offset_err_mag=float(offset_err),
        n_anchor_stars=int(n_anchor),
    )
    return UbercalSolution(
        expids=layout.expids,
        quadrants=layout.quadrants,
        zp_mag=zp,
        zp_err_mag=zp_err,
        source_ids=layout.source_ids,
        star_mag=star_mag,
        star_mag_err=np.where(np.isfinite(star_mag), star_err, np.nan),
        star_n_obs=nobs,
        star_rms_mag=rms,
        star_rejected=rejected,
        starflat=starflat,
        colour_term=colour,
        colour_term_err=colour_err,
        stats=fit_stats,
        qa=_qa(stats, layout, star_mag, rms),
        options=opt,
    )


def _anchor(
    layout: UbercalLayout, star_mag: np.ndarray, star_n: np.ndarray, star_w: np.ndarray
) -> tuple[float, float, int]:
    """Offset ``a`` such that ``m_s + a`` matches the reference catalog."""
    opt = layout.options
    if not layout.has_reference:
        return 0.0, 0.0, 0
    lo, hi = opt.anchor_bp_rp_range
    use = layout.anchor_stars(star_n, star_w) & np.isfinite(star_mag)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(
            use, np.nan_to_num(layout.ref_mag_err) ** 2 + 1.0 / np.where(use, star_w, 1.0), np.inf
        )
    diff = layout.ref_mag - star_mag
    if np.count_nonzero(use) < 3:
        raise UbercalError(
            "reference: fewer than 3 observed reference stars with colours in "
            f"anchor_bp_rp_range={lo, hi} and observation errors <= "
            f"anchor_max_obs_err_mag={opt.anchor_max_obs_err_mag}; the zero points cannot "
            "be anchored"
        )
    for _ in range(10):
        w = np.where(use, 1.0 / var, 0.0)
        mean = float(np.sum(w * np.where(use, diff, 0.0)) / w.sum())
        d = diff[use] - mean
        scale = 1.4826 * np.median(np.abs(d))
        new = use & (np.abs(diff - mean) <= opt.anchor_clip_sigma * max(scale, 1e-6))
        if np.array_equal(new, use):
            break
        use = new
    n = int(use.sum())
    # The scatter of m_ref - m_s holds the reference system's colour term, so the
    # error comes from it, not from the formal weights.
    err = float(np.std(diff[use]) / math.sqrt(n))
    return mean, err, n


def _parameter_variances(
    solved: _Solved, layout: UbercalLayout
) -> tuple[np.ndarray, np.ndarray, float]:
    """Variances of the parameters in the final gauge, the zero-point part of the
    star magnitude variances ``Var(A_sp p) / D^2``, and the error of the mean zero
    point. Without the reference prior the mean zero point is held fixed (the
    variances are relative) and its error is the anchor's, computed elsewhere."""
    opt = layout.options
    centre = not layout.n_anchor
    fi = np.flatnonzero(solved.free)
    npar = layout.n_param
    rng = np.random.default_rng(opt.seed)
    k = opt.error_samples
    samples = np.zeros((npar, k))
    if solved.method == "dense-cholesky":
        L = cast(tuple[np.ndarray, bool], solved.factor)[0]
        # S^-1 = X X^T with X = L^-T, so the gauge-transformed variances are the
        # row sums of squares of T X: one transform, no second pass over columns.
        # LAPACK's triangular inverse costs a third of a triangular solve against
        # the identity (it knows the right-hand side is triangular); L is clean,
        # so its inverse is too.
        L_inv, info = scipy.linalg.lapack.dtrtri(L, lower=1)
        if info != 0:
            raise _singular_error()
        X = np.zeros((npar, len(fi)))
        X[fi] = L_inv.T
        del L_inv
        samples = X @ rng.standard_normal((len(fi), k))
        X = _gauge_transform(X, layout, solved.active, centre_zp=centre, copy=False)
        var = np.einsum("ij,ij->i", X, X)
        del X
    else:
        lu = solved.factor
        if not np.array_equal(lu.perm_r, lu.perm_c):  # type: ignore[attr-defined]
            raise UbercalError("sparse factorisation pivoted off the diagonal; use solver='dense'")
        U = lu.U.tocsr()  # type: ignore[attr-defined]
        d = np.sqrt(U.diagonal())
        # S = Pr^T L U Pc^T with Pr = Pc^T and U = diag(U) L^T, so U^-1 diag(U)^1/2 z,
        # permuted back, has covariance S^-1.
        y = scipy.sparse.linalg.spsolve_triangular(
            U, d[:, None] * rng.standard_normal((len(fi), k)), lower=False
        )
        samples[fi] = y[lu.perm_c]  # type: ignore[attr-defined]
        var = None
    samples = _gauge_transform(samples, layout, solved.active, centre_zp=False)
    zp_active = solved.active[: layout.n_zp]
    mean_zp_err = float(np.std(samples[: layout.n_zp][zp_active].mean(axis=0), ddof=1))
    if centre:
        samples = _gauge_transform(samples, layout, solved.active, centre_zp=True)
    if var is None:
        var = samples.var(axis=1) * k / max(k - 1, 1)
    var = np.where(solved.active, var, np.nan)
    # Var(A_sp p) per star from the samples (exact covariance would need one solve per star).
    ne = solved.ne
    aps_t = ne.aps.T.tocsr()
    # Blocks of samples in threads (scipy releases the GIL in the product); only
    # the sums of squares are kept (the projections are n_star x k: 1 GB at 10 M
    # observations).
    blocks = np.array_split(np.nan_to_num(samples), max(opt.threads, 1), axis=1)

    def sum_sq(block: np.ndarray) -> np.ndarray:
        proj = aps_t @ block
        return np.einsum("ij,ij->i", proj, proj)

    with concurrent.futures.ThreadPoolExecutor(len(blocks)) as pool:
        total = functools.reduce(operator.add, pool.map(sum_sq, blocks))
    inv_d = np.divide(1.0, ne.star_w, out=np.zeros_like(ne.star_w), where=ne.star_w > 0)
    star_var_p = total / k * inv_d**2
    return var, star_var_p, mean_zp_err


def _qa(
    stats: _PassStatistics, layout: UbercalLayout, star_mag: np.ndarray, rms: np.ndarray
) -> UbercalQA:
    hist = stats.qa_hist
    width = 2 * _QA_HIST_HALF_RANGE_MAG / _QA_HIST_BINS
    cum = np.cumsum(hist, axis=1)
    tot = cum[:, -1]
    half = tot / 2.0
    j = np.argmax(cum >= half[:, None], axis=1)
    below = np.where(j > 0, cum[np.arange(len(j)), np.maximum(j - 1, 0)], 0)
    inbin = np.maximum(hist[np.arange(len(j)), j], 1)
    med = -_QA_HIST_HALF_RANGE_MAG + width * (j + (half - below) / inbin)
    med = np.where(tot > 0, med, np.nan).reshape(layout.n_q, *layout.options.qa_cells)
    bins = _REPEATABILITY_BINS_MAG
    which = np.digitize(star_mag, bins) - 1
    ok = np.isfinite(rms) & np.isfinite(star_mag) & (which >= 0) & (which < len(bins) - 1)
    medians = np.full(len(bins) - 1, np.nan)
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    for b in np.unique(which[ok]):
        sel = ok & (which == b)
        medians[b] = np.median(rms[sel])
        counts[b] = sel.sum()
    return UbercalQA(
        residual_median_mag=med,
        repeatability_mag_bins=bins,
        repeatability_median_mag=medians,
        repeatability_n_stars=counts,
    )
