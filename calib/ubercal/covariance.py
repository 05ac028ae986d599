"""Covariance: the errors of the parameters in the final gauge and the zero-point
part of the star magnitude errors."""

from __future__ import annotations

import concurrent.futures
import functools
import operator
from typing import cast

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from calib.ubercal.errors import UbercalError, _singular_error
from calib.ubercal.gauge import _gauge_transform
from calib.ubercal.layout import UbercalLayout
from calib.ubercal.solvers import _Solved


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
