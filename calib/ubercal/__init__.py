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
by dense Cholesky up to ``dense_max_params`` unknowns; above, ``solver='auto'``
solves it by matrix-free preconditioned conjugate gradients
(:mod:`calib.ubercal.iterative`: star-complete partitions, one pass over the
observations per iteration, the Schur complement never formed). Sparse LU
(SuperLU, symmetric mode, minimum-degree ordering) of the formed system is
``solver='sparse'``. Outlier passes update the formed Schur complement for the
stars whose observations changed only, and warm-start the iterative solve.

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
path, from ``error_samples`` random draws of ``S^-1`` on the sparse and iterative
paths.

Outliers: each pass clips observations whose residual, normalised by its error
and its leverage on the star magnitude, exceeds ``clip_sigma``, and rejects for
good the stars whose chi2 (clipped observations included, the largest term
forgiven) is ``star_clip_sigma`` above its expectation: variable stars. Passes
stop when the selection is stable.
"""

from calib.ubercal.errors import DisconnectedGraphError, UbercalError
from calib.ubercal.layout import UbercalLayout, build_layout
from calib.ubercal.normal import NormalEquations, accumulate_normal_equations
from calib.ubercal.observations import (
    InMemoryObservations,
    ObservationChunk,
    ObservationSource,
    ReferenceStars,
)
from calib.ubercal.options import UbercalOptions
from calib.ubercal.qa import FitStatistics, UbercalQA
from calib.ubercal.solve import UbercalSolution, fit_starflat, solve_ubercal

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
    "fit_starflat",
    "solve_ubercal",
]
