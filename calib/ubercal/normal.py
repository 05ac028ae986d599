"""Normal equations of chunks of observations, summable over chunks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from calib.ubercal.layout import UbercalLayout, _Indexed
from calib.ubercal.observations import ObservationChunk

# Weights are >= 1/mag^2 for any real error; sums that cancel leave ~1e-12.
_PRUNE_WEIGHT = 1e-8


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
