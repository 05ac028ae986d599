"""Solvers of the reduced system: the star block eliminated analytically (Schur
complement), factorised densely (Cholesky) or sparsely (LU); graph checks."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph
import scipy.sparse.linalg

from calib.ubercal.errors import DisconnectedGraphError, UbercalError, _singular_error
from calib.ubercal.gauge import _gauge_pins
from calib.ubercal.layout import UbercalLayout
from calib.ubercal.normal import NormalEquations
from calib.ubercal.priors import parameter_prior, prior_dominated


@dataclass(frozen=True)
class _Parameters:
    """A solution in parameter space, for computing residuals."""

    p: np.ndarray  # (n_param,), NaN where unconstrained
    star_mag: np.ndarray  # (n_star,), NaN where not solved
    star_weight: np.ndarray  # (n_star,) 1/mag^2, sum of weights of used observations


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
    prior_dominated: np.ndarray  # (n_param,) bool: the data say less than the prior


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
    P = parameter_prior(layout)
    diag_p = P.diagonal()
    diag_a = ne.app.diagonal() + diag_p
    diag_s = S.diagonal()
    # A parameter seen only by stars observed once has A_pp > 0 but S_pp = 0;
    # one with a prior is always constrained (by it, at least).
    active = (diag_a > 0) & (diag_s + diag_p > 1e-9 * diag_a)
    if not active[: layout.n_zp].any():
        raise UbercalError("no zero point is constrained: no star is observed twice")
    _check_connected(S, layout, active)
    free = active & ~_gauge_pins(layout, active, diag_s + diag_p)
    fi = np.flatnonzero(free)
    Sff = (S + P)[fi][:, fi] if P.nnz else S[fi][:, fi]
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
    flags = prior_dominated(diag_s, P)
    return _Solved(ne, S, params, active, free, method, factor, len(fi), prior_ne, flags)


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
