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
