"""Priors on the starflat and the exposure gradients: zero with a stated scatter,
and optionally a smoothness penalty between neighbouring cells, so that what the
data do not constrain comes out at its prior, with the prior's error, instead of
making the reduced system singular (docs/ubercal.md, "Priors")."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from calib.ubercal.layout import UbercalLayout

__all__ = ["parameter_prior", "prior_dominated", "prior_rows"]


def parameter_prior(layout: UbercalLayout) -> sp.csr_matrix:
    """Information matrix of the parameter priors (all centred on zero), shape
    (n_param, n_param), 1/mag^2: ``1 / starflat_prior_mag^2`` on each cell,
    ``1 / gradient_prior_mag^2`` on each gradient coefficient, and the graph
    Laplacian of the cells' 4-neighbours within each quadrant over
    ``starflat_smoothness_mag^2``. Added to the reduced system as it is (the
    priors act on parameters only, not on stars)."""
    opt = layout.options
    npp = layout.n_param
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    cells = np.arange(layout.n_zp, layout.n_zp + layout.n_cell)
    if opt.starflat and opt.starflat_prior_mag is not None:
        rows.append(cells)
        cols.append(cells)
        vals.append(np.full(len(cells), opt.starflat_prior_mag**-2))
    if opt.starflat and opt.starflat_smoothness_mag is not None:
        ncy, ncx = opt.grid
        grid = cells.reshape(layout.n_q, ncy, ncx)
        pairs = [
            (grid[:, :, :-1].ravel(), grid[:, :, 1:].ravel()),
            (grid[:, :-1, :].ravel(), grid[:, 1:, :].ravel()),
        ]
        w = opt.starflat_smoothness_mag**-2
        for a, b in pairs:
            rows += [a, b, a, b]
            cols += [a, b, b, a]
            vals += [np.full(len(a), w)] * 2 + [np.full(len(a), -w)] * 2
    if opt.exposure_gradient and opt.gradient_prior_mag is not None:
        g = np.arange(layout.gradient_start, layout.gradient_start + layout.n_gradient)
        rows.append(g)
        cols.append(g)
        vals.append(np.full(len(g), opt.gradient_prior_mag**-2))
    if not rows:
        return sp.csr_matrix((npp, npp))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(npp, npp)
    )


def prior_dominated(data_diag: np.ndarray, prior: sp.csr_matrix) -> np.ndarray:
    """Parameters with a prior on which the data carry less information than the
    prior: the reduced system's diagonal without the prior (the information on
    the parameter with all others known) below the prior's, shape (n_param,)
    bool. Such a parameter sits near its prior value with nearly its prior error."""
    p = prior.diagonal()
    return (p > 0) & (data_diag < p)


def prior_rows(layout: UbercalLayout) -> int:
    """Prior equations (rows) that :func:`parameter_prior` stands for, for the
    degrees of freedom: one per cell and gradient coefficient with a prior, one
    per neighbouring cell pair with a smoothness penalty."""
    opt = layout.options
    n = 0
    if opt.starflat and opt.starflat_prior_mag is not None:
        n += layout.n_cell
    if opt.starflat and opt.starflat_smoothness_mag is not None:
        ncy, ncx = opt.grid
        n += layout.n_q * (ncy * (ncx - 1) + (ncy - 1) * ncx)
    if opt.exposure_gradient and opt.gradient_prior_mag is not None:
        n += layout.n_gradient
    return n
