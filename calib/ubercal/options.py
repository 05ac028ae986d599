"""Options of the ubercal fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class UbercalOptions:
    """Options of the ubercal fit.

    Attributes
    ----------
    zp_mode : {'auto', 'exposure_quadrant', 'exposure'}
        One zero point per exposure and quadrant, or one per exposure; ``'auto'``
        sizes it to the data (:mod:`calib.ubercal.sizing`): per exposure-quadrant
        when the median exposure-quadrant has at least ``auto_min_obs_per_zp``
        usable observations of stars seen twice or more, else per exposure.
    starflat : bool
        Fit a starflat (delta-zp per superpixel cell of each quadrant).
    cells : (int, int) or 'auto'
        Starflat grid per quadrant, (ncy, ncx); ``'auto'`` sizes it to the data:
        ``n`` cells per axis with ``n <= auto_max_cells``, ``n^2 <= (median usable
        observations per quadrant) / auto_obs_per_cell`` and ``n <=
        auto_cells_per_dither x`` (median rms position of a star over its visits,
        in quadrant widths), at least 1.
    auto_min_obs_per_zp : float
        Sizing rule of ``zp_mode='auto'``.
    auto_obs_per_cell : float
        Sizing rule of ``cells='auto'``: observations wanted per cell.
    auto_max_cells : int
        Sizing rule of ``cells='auto'``: most cells per axis.
    auto_cells_per_dither : float
        Sizing rule of ``cells='auto'``: cells per axis per quadrant width of rms
        dither (a star that hardly moves cannot tell neighbouring cells apart).
    auto_max_gradient_err_mag : float, mag
        Sizing rule of ``exposure_gradient='auto'``: the largest median error of
        an exposure's gradient (across one quadrant width) for which it is fitted.
    starflat_prior_mag : float or None, mag
        Prior scatter of each starflat cell about zero: a cell the data do not
        constrain comes out at 0 with this error (flagged ``prior_dominated``)
        instead of making the system singular. The prior also fixes the exact
        per-quadrant (per focal plane) zero point/starflat trade: its minimum
        along that direction is the zero mean of the cells, the stated gauge.
        None: no prior (the trade is then pinned and unconstrained cells raise).
    starflat_smoothness_mag : float or None, mag
        Prior scatter of the difference between neighbouring cells of a
        quadrant (a smoothness penalty); None: none.
    gradient_prior_mag : float or None, mag
        Prior scatter of each exposure's gradient coefficients about zero (the
        change across one quadrant width); None: none.
    colour_term : bool
        Fit a per-quadrant colour term ``k_q (bp_rp - colour_pivot)``; needs a
        reference catalog with ``bp_rp``.
    colour_pivot : float, mag
        Colour at which the colour term vanishes.
    exposure_gradient : bool or 'auto'
        Fit a linear zero-point gradient per exposure, the same within every
        quadrant: ``g_x (x / quad_nx - 0.5) + g_y (y / quad_ny - 0.5)`` [mag]
        (grey clouds and differential airmass vary across the focal plane; the
        quadrant-to-quadrant part lives in the per exposure-quadrant zero points).
        ``'auto'`` fits it when the data measure it: the median exposure's
        gradient error, from its stars' errors and spread over the quadrant, at
        most ``auto_max_gradient_err_mag`` (:mod:`calib.ubercal.sizing`).
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
    solver : {'auto', 'dense', 'sparse', 'iterative'}
        Solver of the reduced system: dense Cholesky or sparse LU of the formed
        Schur complement, or matrix-free preconditioned conjugate gradients
        (:mod:`calib.ubercal.iterative`: the Schur complement is applied in one
        pass over the observations per iteration and never formed); ``'auto'``:
        dense up to ``dense_max_params`` unknowns, iterative above.
    dense_max_params : int
        Largest reduced system solved densely by ``'auto'``.
    cg_tolerance : float
        Iterative solver: stop when the residual norm of the reduced system is
        this fraction of the right-hand side's.
    cg_max_iterations : int
        Iterative solver: most iterations per solve.
    preconditioner : {'block_jacobi', 'jacobi', 'two_level', 'two_level_exposures'}
        Iterative solver: exact diagonal blocks of the Schur complement per
        exposure (its zero points and gradients), the diagonal elsewhere; or the
        diagonal only; or the blocks plus a coarse correction on the directions
        the data leave almost free (per quadrant its zero points against its
        cells, the mean exposure gradient against a starflat tilt), and with
        ``'two_level_exposures'`` one coarse unknown per exposure as well (all
        its zero points: the footprint-wide modes); docs/ubercal.md has the
        measurements.
    partition_obs : int
        Iterative solver: observations per star-complete partition (every
        observation of a star in one partition, so that the star block is
        eliminated inside the partition and one pass applies the Schur complement).
    error_cg_tolerance : float
        Iterative solver: tolerance of the solves of the error estimate.
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
        (all parameters on the sparse path; the zero-point part of star errors);
        on the iterative path, solutions for simulated data noise through the
        same solver (a variance to ``sqrt(2 / error_samples)``;
        :mod:`calib.ubercal.iterative`).
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

    zp_mode: Literal["auto", "exposure_quadrant", "exposure"] = "auto"
    starflat: bool = True
    cells: tuple[int, int] | Literal["auto"] = "auto"
    auto_min_obs_per_zp: float = 10.0
    auto_obs_per_cell: float = 100.0
    auto_max_cells: int = 10
    auto_cells_per_dither: float = 50.0
    starflat_prior_mag: float | None = 0.05
    starflat_smoothness_mag: float | None = None
    gradient_prior_mag: float | None = 0.05
    colour_term: bool = False
    colour_pivot: float = 1.0
    exposure_gradient: bool | Literal["auto"] = "auto"
    auto_max_gradient_err_mag: float = 0.003
    error_floor_mag: float = 0.005
    clip_sigma: float = 5.0
    star_clip_sigma: float = 5.0
    max_iterations: int = 10
    clip_tolerance: float = 1e-5
    solver: Literal["auto", "dense", "sparse", "iterative"] = "auto"
    dense_max_params: int = 8000
    cg_tolerance: float = 1e-9
    cg_max_iterations: int = 3000
    preconditioner: Literal["block_jacobi", "jacobi", "two_level", "two_level_exposures"] = (
        "two_level_exposures"
    )
    partition_obs: int = 2_000_000
    error_cg_tolerance: float = 1e-3
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
        if self.zp_mode not in ("auto", "exposure_quadrant", "exposure"):
            raise ValueError(
                f"zp_mode must be 'auto', 'exposure_quadrant' or 'exposure', got {self.zp_mode!r}"
            )
        if self.solver not in ("auto", "dense", "sparse", "iterative"):
            raise ValueError(
                f"solver must be 'auto', 'dense', 'sparse' or 'iterative', got {self.solver!r}"
            )
        if self.preconditioner not in (
            "block_jacobi",
            "jacobi",
            "two_level",
            "two_level_exposures",
        ):
            raise ValueError(
                "preconditioner must be 'block_jacobi', 'jacobi', 'two_level' or "
                f"'two_level_exposures', got {self.preconditioner!r}"
            )
        if isinstance(self.cells, list):  # from JSON (pydantic, attrs)
            object.__setattr__(self, "cells", tuple(self.cells))
        for name in ("cells", "qa_cells"):
            v = getattr(self, name)
            if name == "cells" and v == "auto":
                continue
            if isinstance(v, str) or len(v) != 2 or min(v) < 1:
                raise ValueError(
                    f"{name} must be two positive integers (ny, nx)"
                    + (" or 'auto'" if name == "cells" else "")
                    + f", got {v!r}"
                )
        for name in ("starflat_prior_mag", "starflat_smoothness_mag", "gradient_prior_mag"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if self.exposure_gradient not in (True, False, "auto"):
            raise ValueError(
                f"exposure_gradient must be true, false or 'auto', got {self.exposure_gradient!r}"
            )
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
            "auto_min_obs_per_zp",
            "auto_obs_per_cell",
            "auto_cells_per_dither",
            "auto_max_gradient_err_mag",
            "cg_tolerance",
            "error_cg_tolerance",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_iterations",
            "error_samples",
            "chunk_size",
            "dense_max_params",
            "threads",
            "auto_max_cells",
            "cg_max_iterations",
            "partition_obs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def grid(self) -> tuple[int, int]:
        """The starflat grid (ncy, ncx) once sized (not ``'auto'``)."""
        if isinstance(self.cells, str):
            raise ValueError("cells: 'auto' is resolved by build_layout; no grid yet")
        return self.cells

    def replace(self, **changes: object) -> UbercalOptions:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
