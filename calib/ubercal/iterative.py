"""Matrix-free iterative solver of the reduced system, for surveys whose Schur
complement cannot be formed (docs/ubercal.md, "Iterative solver").

The observations are regrouped once into *star-complete* partitions: every
observation of a star sits in one partition. The star block of the normal
equations is diagonal, so inside a partition the stars are eliminated exactly
and the partition's share of ``S x`` is

    S_k x = C_k^T W_k (I - H_k) C_k x,

with ``C_k`` the partition's design rows (d model / d parameter, one row per
observation plus the reference prior's pseudo-observations), ``W_k`` the
weights of the observations in use and ``H_k`` the weighted projection on the
star means. ``S x = sum_k S_k x`` is one map-reduce over the partitions (one
pass over the observations per iteration), and nothing of size ``S`` is ever
formed. (Night catalogs are not star-complete, a star is seen on many nights:
their ``S x`` would need two passes with a star-sized exchange between them.)

Preconditioned conjugate gradients solve ``(S + P) x = b`` (``P`` the
parameter priors) on the parameters left free by the gauge pins. The
preconditioner (``UbercalOptions.preconditioner``, measured in docs/ubercal.md)
is the exact block diagonal of ``S`` -- per exposure its zero points and
gradient coefficients (an arrowhead block: zero points of one exposure share no
star), per parameter elsewhere -- plus, by default, a Galerkin coarse correction
on the directions the data leave almost free (per quadrant its zero points
against its cells; the mean gradient against a starflat tilt) and on one
aggregate per exposure, which keeps the iteration count flat as the footprint
grows. Each outlier pass starts from the previous solution (warm start).

Errors: stochastic, through the same solver at a looser tolerance: solutions
``x_k = (S + P)^-1 b(eps_k)`` for ``error_samples`` draws of the data noise
(``eps ~ N(0, 1/w)`` per observation and prior equation, reduced like the
data), whose covariance is ``(S + P)^-1``; the parameter variances are their
mean squares in the final gauge and the zero-point part of the star variances
their projections. (Hutchinson's estimator with Rademacher probes and the block
diagonal as control variate was measured and rejected: docs/ubercal.md.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph
import scipy.sparse.linalg

from calib.ubercal.errors import DisconnectedGraphError, UbercalError
from calib.ubercal.gauge import _gauge_pins, _gauge_transform, anchor_stars
from calib.ubercal.layout import UbercalLayout, _Indexed
from calib.ubercal.normal import _pair_sums, _prepare, _Prepared
from calib.ubercal.observations import ObservationChunk, ObservationSource, _lookup
from calib.ubercal.outliers import (
    _PassStatistics,
    _rejected_stars,
    _require_usable,
    _selected,
    _statistics,
)
from calib.ubercal.priors import parameter_prior, prior_dominated
from calib.ubercal.solvers import _Parameters

__all__ = [
    "InMemoryPartitions",
    "Partitions",
    "concat_chunks",
    "partition_in_memory",
    "split_chunk",
]

T = TypeVar("T")


class Partitions(Protocol):
    """Star-complete partitions wherever they live (this process, Dask workers).
    ``map`` applies a function to every partition and keeps the results where
    the partitions are; ``map_reduce`` returns the sum (``+``) of the results;
    ``map_sum`` takes a function returning ``(new partition, value)`` and returns
    the new partitions and the sum of the values."""

    def map(self, fn: Callable[[Any], Any]) -> Partitions: ...

    def map_reduce(self, fn: Callable[[Any], T]) -> T: ...

    def map_sum(self, fn: Callable[[Any], tuple[Any, T]]) -> tuple[Partitions, T]: ...


@dataclass(frozen=True)
class InMemoryPartitions:
    """:class:`Partitions` held in this process, mapped over by ``threads``
    threads (the solver's products spend their time in numpy and scipy.sparse
    loops that release the GIL); results are summed in partition order, so the
    sum does not depend on which thread finished first. Sums are taken as the
    results come: each result is parameter-sized (a million zero points: 9 MB,
    140 MB for 16 right-hand sides), and a survey has tens of partitions."""

    parts: Sequence[Any]
    threads: int = 1

    def _each(self, fn: Callable[[Any], T]) -> Iterator[T]:
        if self.threads <= 1 or len(self.parts) <= 1:
            yield from (fn(p) for p in self.parts)
            return
        with concurrent.futures.ThreadPoolExecutor(min(self.threads, len(self.parts))) as pool:
            yield from pool.map(fn, self.parts)

    def map(self, fn: Callable[[Any], Any]) -> InMemoryPartitions:
        return InMemoryPartitions(list(self._each(fn)), self.threads)

    def map_reduce(self, fn: Callable[[Any], T]) -> T:
        return functools.reduce(operator.add, self._each(fn))

    def map_sum(self, fn: Callable[[Any], tuple[Any, T]]) -> tuple[InMemoryPartitions, T]:
        parts: list[Any] = []
        total: Any = None
        for part, value in self._each(fn):
            parts.append(part)
            total = value if total is None else total + value
        return InMemoryPartitions(parts, self.threads), total


ERROR_BLOCK = 16
"""Noise samples solved (and projected onto the stars) at a time: a partition's
temporaries are ``n_obs x ERROR_BLOCK`` (a 2 M-observation partition with the
stage's 64 samples at once held ~1 GB in each; the worker running the fit of a
27.6 M-observation store reached its memory limit)."""


# --- partitioning ---------------------------------------------------------------


def star_partition(source_ids: np.ndarray, n_parts: int) -> Callable[[ObservationChunk], Any]:
    """Key function: the partition (0..n_parts-1) of each observation of a chunk,
    contiguous ranges of the sorted star identifiers (unknown stars go to 0)."""
    return functools.partial(_partition_of, source_ids=source_ids, n_parts=n_parts)


def _partition_of(chunk: ObservationChunk, source_ids: np.ndarray, n_parts: int) -> np.ndarray:
    s = _lookup(source_ids, np.asarray(chunk.source_id))
    return np.where(s >= 0, s * n_parts // max(len(source_ids), 1), 0)


@dataclass(frozen=True)
class _Pieces:
    """The pieces of chunks that go to each partition (summing concatenates)."""

    parts: tuple[tuple[ObservationChunk, ...], ...]

    def __add__(self, other: _Pieces) -> _Pieces:
        return _Pieces(tuple(a + b for a, b in zip(self.parts, other.parts, strict=True)))


def split_chunk(
    chunk: ObservationChunk, key: Callable[[ObservationChunk], np.ndarray], n_parts: int
) -> list[ObservationChunk]:
    """A chunk's observations per partition."""
    k = key(chunk)
    order = np.argsort(k, kind="stable")
    bounds = np.searchsorted(k[order], np.arange(n_parts + 1))
    return [chunk.take(order[bounds[i] : bounds[i + 1]]) for i in range(n_parts)]


def concat_chunks(chunks: Sequence[ObservationChunk]) -> ObservationChunk:
    """One chunk of several (flags kept when any chunk has them)."""
    names = [f.name for f in dataclasses.fields(ObservationChunk)]
    cols: dict[str, np.ndarray] = {}
    for n in names:
        vals = [getattr(c, n) for c in chunks]
        if n == "flags":
            if all(v is None for v in vals):
                continue
            vals = [
                np.zeros(len(c), dtype=np.int64) if v is None else v
                for c, v in zip(chunks, vals, strict=True)
            ]
        cols[n] = np.concatenate(vals)
    return ObservationChunk(**cols)


def _split_to_pieces(
    chunk: ObservationChunk, key: Callable[[ObservationChunk], np.ndarray], n_parts: int
) -> _Pieces:
    return _Pieces(tuple((c,) for c in split_chunk(chunk, key, n_parts)))


def partition(
    source: ObservationSource, layout: UbercalLayout, n_parts: int, *, threads: int = 1
) -> Partitions:
    """Regroup ``source`` into ``n_parts`` star-complete partitions, prepared for
    the solver. A source with a ``partition(key, n_parts, build)`` method does it
    where its chunks live (the stage's Dask source keeps them on the workers);
    any other is regrouped in this process."""
    key = star_partition(layout.source_ids, n_parts)
    build = functools.partial(_build_part, layout=layout, n_parts=n_parts)
    if hasattr(source, "partition"):
        parts = source.partition(key, n_parts, build)
        if isinstance(parts, InMemoryPartitions):
            return dataclasses.replace(parts, threads=threads)
        return parts  # type: ignore[no-any-return]
    return partition_in_memory(source, key, n_parts, build, threads=threads)


def partition_in_memory(
    source: ObservationSource,
    key: Callable[[ObservationChunk], np.ndarray],
    n_parts: int,
    build: Callable[..., Any],
    *,
    threads: int = 1,
) -> InMemoryPartitions:
    """Regroup a source into partitions held in this process: each chunk is
    split by ``key`` where it lives, the pieces come here and are built with
    ``build(chunk, index=k)``, each partition's pieces let go once it is built
    (the pieces are a copy of the observations: at survey size, not two)."""
    pieces = list(
        source.map_reduce(functools.partial(_split_to_pieces, key=key, n_parts=n_parts)).parts
    )
    parts = []
    for i in range(n_parts):
        chunk = concat_chunks(pieces[i])
        pieces[i] = ()
        parts.append(build(chunk, index=i))
        del chunk
    return InMemoryPartitions(parts, threads)


@dataclass(frozen=True)
class _Part:
    """A star-complete partition prepared for the solver, with the selection of
    the current pass.

    ``layout`` is the problem's layout with its star arrays cut to this
    partition's stars (global star index ``star_lo + local``); ``prep`` the
    observations sorted by local star (its ``ix`` keeps only ``star``, ``qa`` and
    ``valid``: the design lives in ``C``); ``C`` (n_obs, n_param) the design
    rows d model / d parameter up to sign.
    """

    index: int
    star_lo: int
    layout: UbercalLayout
    prep: _Prepared
    C: sp.csr_matrix
    used: np.ndarray  # (n,) bool: observations in the current solve
    rejected: np.ndarray  # (n_s,) bool: stars rejected for the next selection
    anchor_w: np.ndarray  # (n_s,) reference prior weight of anchor stars (0: none)
    wp: np.ndarray  # (n_s,) the prior's weight now: anchor stars with data in use
    colp: np.ndarray  # (n_s,) bp_rp - pivot of the prior
    mref: np.ndarray  # (n_s,) reference magnitude (0 where no prior)
    star_ptr: np.ndarray | None = None  # (n_s + 1,) first observation of each star (sorted)
    D_obs: np.ndarray | None = None  # (n_s,) sum wu per star
    inv_w: np.ndarray | None = None  # (n_s,) 1 / (D_obs + wp), 0 for stars without weight
    stats: _PassStatistics | None = None  # of the last pass (local stars)
    newly: np.ndarray | None = None  # (n_s,) bool: rejected by the last pass

    @property
    def wu(self) -> np.ndarray:
        """(n,) weights of the observations in use, 0 for the others: made when
        needed (kept, they were 8 bytes an observation)."""
        return np.where(self.used, self.prep.w, 0.0)

    def select(self, used: np.ndarray, rejected: np.ndarray) -> _Part:
        """This partition with a new selection; the prior follows the stars that
        lost or regained all their observations (as on the direct path)."""
        n_s = self.layout.n_star
        star = self.prep.ix.star
        has_data = np.bincount(star, weights=used, minlength=n_s) > 0
        wp = np.where(has_data, self.anchor_w, 0.0)
        wu = np.where(used, self.prep.w, 0.0)
        # The observations are sorted by star: sums per star are segment sums
        # (a sparse aggregation matrix cost 12 bytes per observation more).
        star_ptr = np.searchsorted(star, np.arange(n_s + 1))
        D_obs = _segment_sums(star_ptr, wu)
        D = D_obs + wp
        # Kept with the selection: every product of the solver needs them.
        return dataclasses.replace(
            self,
            used=used,
            rejected=rejected,
            wp=wp,
            star_ptr=star_ptr,
            D_obs=D_obs,
            inv_w=np.divide(1.0, D, out=np.zeros_like(D), where=D > 0),
        )


def _build_part(
    chunk: ObservationChunk, *, layout: UbercalLayout, n_parts: int, index: int
) -> _Part:
    ns = layout.n_star
    lo, hi = -(-index * ns // n_parts), -(-(index + 1) * ns // n_parts)
    # Stars of this range: [lo, hi) in the sorted identifiers (ceil division,
    # the inverse of _partition_of's floor).
    local = dataclasses.replace(
        layout,
        source_ids=layout.source_ids[lo:hi],
        colour=layout.colour[lo:hi],
        ref_mag=layout.ref_mag[lo:hi],
        ref_mag_err=layout.ref_mag_err[lo:hi],
        ref_bp_rp=layout.ref_bp_rp[lo:hi],
    )
    prep = _prepare(chunk, local)
    ix = prep.ix
    C = _design(prep, local)
    none = np.zeros(0, dtype=np.int64)
    slim = _Indexed(
        star=ix.star.astype(np.int32),
        zp=none,
        cell=none,
        iq=none,
        qa=ix.qa.astype(np.int32),
        valid=ix.valid,
        exp=none,
        fx=np.zeros(0),
        fy=np.zeros(0),
    )
    prep = dataclasses.replace(prep, ix=slim, order=none)
    n_s = local.n_star
    z = np.zeros(n_s)
    part = _Part(index, lo, local, prep, C, prep.good, np.zeros(n_s, bool), z, z, z, z)
    return part.select(prep.good.copy(), part.rejected)


def _design(prep: _Prepared, layout: UbercalLayout) -> sp.csr_matrix:
    """Rows ``c_o`` with ``model_o = m_s - c_o . p`` (0 for unusable observations)."""
    opt = layout.options
    ix = prep.ix
    g = prep.good
    cols, vals = [np.where(g, ix.zp, 0)], [g.astype(np.float32)]
    if opt.starflat:
        cols.append(np.where(g, layout.n_zp + ix.cell, 0))
        vals.append(vals[0])
    if opt.colour_term:
        cols.append(np.where(g, layout.colour_slice.start + ix.iq, 0))
        vals.append(np.where(g, layout.colour[np.where(g, ix.star, 0)], 0.0))
    if opt.exposure_gradient:
        gx = np.where(g, layout.gradient_start + 2 * ix.exp, 0)
        cols += [gx, gx + 1]
        vals += [np.where(g, ix.fx, 0.0), np.where(g, ix.fy, 0.0)]
    n, m = len(g), len(cols)
    # float32 values (1, colours, positions in the quadrant: 1e-7 relative) save
    # 16 bytes an observation and cost nothing in the products (measured).
    return sp.csr_matrix(
        (
            np.stack(vals, axis=1).astype(np.float32).ravel(),
            np.stack(cols, axis=1).ravel().astype(np.int32),
            np.arange(0, n * m + 1, m, dtype=np.int64 if n * m >= 2**31 else np.int32),
        ),
        shape=(n, layout.n_param),
    )


# --- one partition: passes, products, star results -------------------------------


def _segment_sums(star_ptr: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """Per star, the sum of ``wv`` (n[, k]) over its observations, which are the
    rows ``star_ptr[s]:star_ptr[s + 1]``; 0 for a star without any.

    A summing matrix made for the call (its ones and column indices are
    transient: 12 bytes an observation not kept). ``np.add.reduceat`` over the
    rows gives the same sums but was 4x slower for 16 columns (165 against
    24 ms for 2 M observations)."""
    n = len(wv)
    index = np.int32 if n < 2**31 else np.int64
    summing = sp.csr_matrix(
        (np.ones(n), np.arange(n, dtype=index), star_ptr.astype(index)),
        shape=(len(star_ptr) - 1, n),
    )
    return np.asarray(summing @ wv)


def _star_sums(part: _Part, v: np.ndarray) -> np.ndarray:
    """Per local star, ``sum wu v`` over the observations in use (v of shape
    (n,) or (n, k))."""
    assert part.star_ptr is not None
    shape = (-1,) + (1,) * (v.ndim - 1)
    return _segment_sums(part.star_ptr, part.wu.reshape(shape) * v)


def _reduced_product(part: _Part, v: np.ndarray, vp: np.ndarray) -> np.ndarray:
    """``C^T W (I - H) [v; vp]`` for observation values ``v`` (n[, k]) and prior
    pseudo-observation values ``vp`` (n_s[, k]) of the anchor coefficient:
    the star means of the used observations and the prior are removed and the
    weighted remainder summed into the parameters, shape (n_param[, k]).
    ``v`` is overwritten (every caller hands a temporary: this is the inner
    loop of the solver, and n x k temporaries are its largest arrays)."""
    assert part.star_ptr is not None
    assert part.inv_w is not None
    shape = (-1,) + (1,) * (v.ndim - 1)
    wp = part.wp.reshape(shape)
    wu = part.wu.reshape(shape)
    v *= wu  # W v; then W (v - mean) = W v - W mean
    mean = _segment_sums(part.star_ptr, v)
    mean += wp * vp
    mean *= part.inv_w.reshape(shape)
    star_mean = np.take(mean, part.prep.ix.star, axis=0)
    star_mean *= wu
    v -= star_mean
    del star_mean
    y = np.asarray(part.C.T @ v)
    if part.layout.n_anchor:
        rp = wp * (vp - mean)
        y[-1] += (part.colp.reshape(shape) * rp).sum(axis=0)
    return y


def _anchor_values(part: _Part, x: np.ndarray) -> np.ndarray:
    """The prior pseudo-observations' ``c . x`` (``colp * a``), shape (n_s[, k])."""
    if not part.layout.n_anchor:
        return np.zeros((part.layout.n_star, *x.shape[1:]))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return part.colp.reshape(shape) * x[-1]


def _apply(part: _Part, x: np.ndarray) -> np.ndarray:
    """This partition's ``S x`` (x of shape (n_param,) or (n_param, k))."""
    return _reduced_product(part, np.asarray(part.C @ x), _anchor_values(part, x))


def _rhs(part: _Part) -> np.ndarray:
    """This partition's ``b = -C^T W (I - H) m`` (observed magnitudes and the
    reference magnitudes of the prior)."""
    return -_reduced_product(part, np.where(part.used, part.prep.mag, 0.0), part.mref)


def _noise_rhs(part: _Part, seed: int, k: int, block: int = 0) -> np.ndarray:
    """``-C^T W (I - H) eps`` for ``k`` draws of the data noise (eps ~ N(0, 1/w)
    for the used observations and the prior): its covariance is ``S``, so its
    solution's is ``S^-1``. Seeded by partition and block of samples, whatever
    the partition order."""
    rng = np.random.default_rng([seed, part.index] if block == 0 else [seed, part.index, block])
    wu = part.wu
    eps = rng.standard_normal((len(wu), k)) / np.sqrt(np.where(wu > 0, wu, 1.0))[:, None]
    epsp = (
        rng.standard_normal((part.layout.n_star, k))
        / np.sqrt(np.where(part.wp > 0, part.wp, 1.0))[:, None]
    )
    return -_reduced_product(part, eps, epsp)


def _star_magnitudes(part: _Part, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star magnitudes at ``p`` under the current selection (the prior included)
    and the weights ``D``, shape (n_s,) each; NaN where a star has no weight."""
    x = np.nan_to_num(p)
    v = np.where(part.used, part.prep.mag, 0.0) + np.asarray(part.C @ x)
    D = part.D_obs + part.wp
    num = _star_sums(part, v) + part.wp * (part.mref + _anchor_values(part, x))
    return np.where(D > 0, num * part.inv_w, np.nan), D


@dataclass(frozen=True)
class _Blocks:
    """Exact block diagonal of the partition's S: per zero point ``zz``, its
    couplings to its exposure's gradient coefficients ``zgx``, ``zgy``, per
    exposure the gradient block ``gxx, gxy, gyy``, per other parameter the
    diagonal ``diag`` (zp entries unused); and ``diag_a`` of ``A_pp``."""

    zz: np.ndarray
    zgx: np.ndarray
    zgy: np.ndarray
    gxx: np.ndarray
    gxy: np.ndarray
    gyy: np.ndarray
    diag: np.ndarray
    diag_a: np.ndarray

    def __add__(self, other: _Blocks) -> _Blocks:
        return _Blocks(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )


def _blocks(part: _Part) -> _Blocks:
    lay = part.layout
    opt = lay.options
    wu = part.wu
    assert part.inv_w is not None
    star = part.prep.ix.star
    inv_d = part.inv_w
    npp, nz, n_exp = lay.n_param, lay.n_zp, len(lay.expids)
    C = part.C.tocoo()
    # A_pp diagonal and the per-(star, parameter) sums a_sj = sum w c: the
    # diagonal of S is sum_o w c^2 - sum_s a_sj^2 / D_s.
    wc = wu[C.row] * C.data
    diag_a = np.bincount(C.col, weights=wc * C.data, minlength=npp)
    a, j, v = _pair_sums(star[C.row].astype(np.int64), lay.n_star, C.col.astype(np.int64), npp, wc)
    diag = diag_a - np.bincount(j, weights=v * v * inv_d[a], minlength=npp)
    if lay.n_anchor:
        w = part.wp * part.colp
        diag_a[-1] += np.sum(w * part.colp)
        # The anchor column couples to stars only through the prior.
        sa = np.bincount(a[j == npp - 1], weights=v[j == npp - 1], minlength=lay.n_star) + w
        diag[-1] = diag_a[-1] - np.sum(sa * sa * inv_d)
    zz = diag[:nz].copy()
    zgx: np.ndarray = np.zeros(nz)
    zgy: np.ndarray = np.zeros(nz)
    gxx: np.ndarray = np.zeros(n_exp)
    gxy: np.ndarray = np.zeros(n_exp)
    gyy: np.ndarray = np.zeros(n_exp)
    if opt.exposure_gradient:
        # One observation per (star, exposure): its zero point and the exposure's
        # gradient pair form the block, w c c^T - w^2 c c^T / D_s.
        m = part.C.indptr[1] - part.C.indptr[0] if part.C.shape[0] else 0
        cols = part.C.indices.reshape(-1, m)
        vals = part.C.data.reshape(-1, m)
        zpc, gcol = cols[:, 0], cols[:, -2]
        fx, fy = vals[:, -2], vals[:, -1]
        e = np.where(wu > 0, (gcol - lay.gradient_start) // 2, 0)  # unusable rows: 0
        f = wu - wu * wu * inv_d[star]
        zgx = np.bincount(zpc, weights=f * fx, minlength=nz)[:nz]
        zgy = np.bincount(zpc, weights=f * fy, minlength=nz)[:nz]
        gxx = np.bincount(e, weights=f * fx * fx, minlength=n_exp)
        gxy = np.bincount(e, weights=f * fx * fy, minlength=n_exp)
        gyy = np.bincount(e, weights=f * fy * fy, minlength=n_exp)
    return _Blocks(zz, zgx, zgy, gxx, gxy, gyy, diag, diag_a)


@dataclass(frozen=True)
class _Components:
    """Connected components of the zero points through shared stars (summing
    merges two partitions' components); ``label[i] == -1``: zero point not
    linked by any star seen twice."""

    label: np.ndarray

    def __add__(self, other: _Components) -> _Components:
        n = len(self.label)
        edges = [(np.flatnonzero(lab >= 0), lab[lab >= 0]) for lab in (self.label, other.label)]
        rows = np.concatenate([e[0] for e in edges])
        cols = np.concatenate([e[1] for e in edges])
        return _Components(_labels(rows, cols, n))


def _labels(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """Component of every node touched by the edges (its smallest node), -1 else."""
    g = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, lab = scipy.sparse.csgraph.connected_components(g, directed=False)
    touched = np.zeros(n, dtype=bool)
    touched[rows] = touched[cols] = True
    first = np.full(lab.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, lab, np.arange(n))
    return np.where(touched, first[lab], -1)


def _components(part: _Part) -> _Components:
    nz = part.layout.n_zp
    k = np.flatnonzero(part.used)
    star = part.prep.ix.star[k]
    zp = part.C.indices[part.C.indptr[k]]  # the first column of a row is its zero point
    same = star[1:] == star[:-1]  # observations come sorted by star
    return _Components(_labels(zp[1:][same], zp[:-1][same], nz))


@dataclass(frozen=True)
class _PassSums:
    """What a pass returns from the partitions (summed): counts and QA
    histograms, stars newly rejected, reference stars in the prior, and (unless
    it is the last pass) the right-hand side, preconditioner blocks and zero-point
    components of the solve that follows."""

    stats: _PassStatistics
    n_newly: int
    n_anchor: int
    rhs: np.ndarray | None = None
    blocks: _Blocks | None = None
    components: _Components | None = None

    def __add__(self, other: _PassSums) -> _PassSums:
        def add(a: Any, b: Any) -> Any:
            return None if a is None or b is None else a + b

        return _PassSums(
            _sum_stats(self.stats, other.stats),
            self.n_newly + other.n_newly,
            self.n_anchor + other.n_anchor,
            add(self.rhs, other.rhs),
            add(self.blocks, other.blocks),
            add(self.components, other.components),
        )


def _sum_stats(a: _PassStatistics, b: _PassStatistics) -> _PassStatistics:
    """Counts and QA histograms of two partitions (their star arrays are local
    to each and stay there)."""
    return dataclasses.replace(
        a,
        qa_hist=a.qa_hist + b.qa_hist,
        counts={k: a.counts[k] + b.counts[k] for k in a.counts},
    )


_STAR_ARRAYS = (
    "star_w_all",
    "star_wr_all",
    "star_chi2_all",
    "star_n_all",
    "star_max",
    "star_max_w",
    "star_max_wr",
    "star_r1",
    "star_r2",
    "star_nobs",
)


def _pass(part: _Part, p: np.ndarray | None, final: bool) -> tuple[_Part, _PassSums]:
    """One outlier pass of a partition: the selection under the solution ``p``
    (None: the first pass, every usable observation), its statistics, the stars
    it rejects (for the next selection), and the right-hand side and
    preconditioner blocks of the solve that follows."""
    lay = part.layout
    opt = lay.options
    prep = part.prep
    if p is None:
        used, clipped, r = _selected(prep, lay, None, part.rejected)
        star_n = np.bincount(prep.ix.star, weights=used, minlength=lay.n_star)
        star_w = np.bincount(
            prep.ix.star, weights=np.where(used, prep.w, 0.0), minlength=lay.n_star
        )
        # The anchor stars are chosen once, from all usable observations.
        anchor = anchor_stars(lay, star_n, star_w) & bool(lay.n_anchor)
        part = dataclasses.replace(
            part,
            anchor_w=np.where(
                anchor,
                1.0 / (np.nan_to_num(lay.ref_mag_err) ** 2 + opt.anchor_scatter_mag**2),
                0.0,
            ),
            colp=np.where(anchor, lay.ref_bp_rp - opt.colour_pivot, 0.0),
            mref=np.where(anchor, lay.ref_mag, 0.0),
        )
        changed = 0
    else:
        star_mag, D = _star_magnitudes(part, p)
        model_p = np.asarray(part.C @ np.nan_to_num(p))  # model = m_s - c . p
        with np.errstate(invalid="ignore"):
            resid = np.where(prep.good, prep.mag - star_mag[prep.ix.star] + model_p, np.nan)
        params = _Parameters(p=p, star_mag=star_mag, star_weight=D)
        used, clipped, r = _selected(prep, lay, params, part.rejected, residual=resid)
        changed = int(np.count_nonzero(used != part.used))
    stats = _statistics(prep, lay, used, clipped, r, changed=changed, solved=p is not None)
    newly = np.zeros(lay.n_star, dtype=bool)
    if p is not None:
        newly = _rejected_stars(stats, opt.star_clip_sigma) & ~part.rejected
    part = part.select(used, part.rejected | newly)
    out = _PassSums(
        dataclasses.replace(stats, **{f: np.zeros(0) for f in _STAR_ARRAYS}),  # type: ignore[arg-type]
        int(newly.sum()),
        int(np.count_nonzero(part.wp)),
    )
    if not final:
        out = dataclasses.replace(
            out, rhs=_rhs(part), blocks=_blocks(part), components=_components(part)
        )
    # The partition keeps its stars' statistics only: the QA histograms (one
    # per map pixel and residual bin, ~80 MB) go into the sum and nowhere else.
    kept = dataclasses.replace(stats, qa_hist=np.zeros((0, 0), dtype=np.int64))
    return dataclasses.replace(part, stats=kept, newly=newly), out


# --- the driver ---------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockJacobi:
    """``M^-1`` of the exact block diagonal (per exposure: zero points and
    gradients, an arrowhead; elsewhere the diagonal), on the free parameters."""

    layout: UbercalLayout
    free: np.ndarray
    inv_d: np.ndarray  # (n_param,) 1 / diagonal, 0 off the free set
    bx: np.ndarray  # (n_exp, nzq): zero point - g_x coupling / its diagonal
    by: np.ndarray
    ginv: np.ndarray | None  # (n_exp, 2, 2) inverse of the gradients' Schur block

    @classmethod
    def build(
        cls, layout: UbercalLayout, blocks: _Blocks, P: sp.csr_matrix, free: np.ndarray, kind: str
    ) -> _BlockJacobi:
        diag = blocks.diag + P.diagonal()
        inv_d = np.divide(1.0, diag, out=np.zeros_like(diag), where=free & (diag > 0))
        n_exp = len(layout.expids)
        nzq = layout.n_zp // max(n_exp, 1)
        bx = by = np.zeros((n_exp, nzq))
        ginv = None
        if layout.options.exposure_gradient and kind != "jacobi":
            g0 = layout.gradient_start
            pd = P.diagonal()[g0 : g0 + 2 * n_exp].reshape(n_exp, 2)
            dz = inv_d[: layout.n_zp].reshape(n_exp, nzq)
            bx = blocks.zgx.reshape(n_exp, nzq) * dz
            by = blocks.zgy.reshape(n_exp, nzq) * dz
            zgx, zgy = blocks.zgx.reshape(n_exp, nzq), blocks.zgy.reshape(n_exp, nzq)
            G = np.empty((n_exp, 2, 2))
            G[:, 0, 0] = blocks.gxx + pd[:, 0] - np.sum(zgx * bx, axis=1)
            G[:, 1, 1] = blocks.gyy + pd[:, 1] - np.sum(zgy * by, axis=1)
            G[:, 0, 1] = G[:, 1, 0] = blocks.gxy - np.sum(zgx * by, axis=1)
            gfree = free[g0 : g0 + 2 * n_exp].reshape(n_exp, 2).all(axis=1)
            G[~gfree] = np.eye(2)
            ginv = np.linalg.inv(G)
            ginv[~gfree] = 0.0
        return cls(layout, free, inv_d, bx, by, ginv)

    def __call__(self, r: np.ndarray) -> np.ndarray:
        y = self.inv_d.reshape((-1,) + (1,) * (r.ndim - 1)) * r
        if self.ginv is None:
            return y
        lay = self.layout
        n_exp, nzq = self.bx.shape
        tail = r.shape[1:]
        g = slice(lay.gradient_start, lay.gradient_start + 2 * n_exp)
        yz = y[: lay.n_zp].reshape(n_exp, nzq, *tail)  # D^-1 r_z
        bx = self.bx.reshape(n_exp, nzq, *([1] * len(tail)))
        by = self.by.reshape(n_exp, nzq, *([1] * len(tail)))
        rg = r[g].reshape(n_exp, 2, *tail)
        rhs = rg - np.stack(
            [
                (bx * r[: lay.n_zp].reshape(yz.shape)).sum(1),
                (by * r[: lay.n_zp].reshape(yz.shape)).sum(1),
            ],
            axis=1,
        )
        yg = np.einsum("eij,ej...->ei...", self.ginv, rhs)
        out = y.copy()
        out[g] = yg.reshape(r[g].shape)
        out[: lay.n_zp] = (yz - bx * yg[:, :1] - by * yg[:, 1:2]).reshape(r[: lay.n_zp].shape)
        return out


class _TwoLevel:
    """Block Jacobi plus an additive coarse correction on the modes it cannot
    see: ``M^-1 r = B^-1 r + Z E^-1 Z^T r`` with ``E = Z^T A Z`` (Galerkin),
    ``A`` the operator being solved and ``Z`` the coarse space: the near-null
    directions of the reduced system (:func:`_coarse_basis`, ``'two_level'``),
    and with ``'two_level_exposures'`` also one aggregate per exposure (all its
    zero points together: the smooth, footprint-wide modes of the zero-point
    graph, which a block-diagonal preconditioner leaves to ever more
    iterations as the footprint grows).

    ``E`` on the near-null directions costs one product per direction (in
    blocks, one multi-right-hand-side product each); on the exposure aggregates
    it is summed from the partitions exactly (``diag(W) - B D^-1 B^T``, ``B``
    the exposure-star weights), a sparse matrix factorised once, the rest
    eliminated onto the few near-null directions. Both are computed once and
    kept through the outlier passes while the free parameters stay the same:
    the selection changes a few observations per pass, and a preconditioner only
    has to be close."""

    def __init__(
        self,
        smoother: _BlockJacobi,
        free: np.ndarray,
        coarse: _Coarse,
    ) -> None:
        self.smoother = smoother
        self.free = free
        self.coarse = coarse

    def __call__(self, r: np.ndarray) -> np.ndarray:
        return self.smoother(r) + self.coarse(r)


@dataclass(frozen=True)
class _Coarse:
    """The coarse correction ``Z E^-1 Z^T r`` of :class:`_TwoLevel`: ``Zg`` the
    near-null directions, ``Ze`` the exposure aggregates (free zero points of
    each exposure), ``Ee`` their factorised block, ``Eeg`` its coupling to the
    directions, ``Sc_inv`` the inverse of the directions' block once the
    exposures are eliminated."""

    Zg: sp.csc_matrix
    Sc_inv: np.ndarray
    Ze: sp.csc_matrix | None = None
    Ee: Any = None  # scipy.sparse.linalg.SuperLU
    Eeg: np.ndarray | None = None

    def __call__(self, r: np.ndarray) -> np.ndarray:
        rg = np.asarray(self.Zg.T @ r)
        if self.Ze is None:
            return np.asarray(self.Zg @ (self.Sc_inv @ rg))
        assert self.Eeg is not None
        ye = self.Ee.solve(np.asarray(self.Ze.T @ r))
        cg = self.Sc_inv @ (rg - self.Eeg.T @ ye)
        ce = ye - self.Ee.solve(self.Eeg @ cg)
        return np.asarray(self.Zg @ cg) + np.asarray(self.Ze @ ce)

    @classmethod
    def build(
        cls,
        layout: UbercalLayout,
        free: np.ndarray,
        apply: Callable[[np.ndarray], np.ndarray],
        parts: Partitions | None,
        block: int = 16,
    ) -> _Coarse:
        Z = _coarse_basis(layout, free)
        AZ = np.concatenate(
            [apply(Z[:, i : i + block].toarray()) for i in range(0, Z.shape[1], block)]
            or [np.zeros((layout.n_param, 0))],
            axis=1,
        )
        Egg = np.asarray(Z.T @ AZ)
        Egg = 0.5 * (Egg + Egg.T)
        if parts is None:
            return cls(Z, np.linalg.pinv(Egg, rcond=1e-12, hermitian=True))
        nz, n_exp = layout.n_zp, len(layout.expids)
        exp_of_zp = np.arange(nz) // (
            layout.n_q if layout.options.zp_mode == "exposure_quadrant" else 1
        )
        ze = np.where(free[:nz], exp_of_zp, -1)
        zi = np.flatnonzero(ze >= 0)
        Ze = sp.csc_matrix((np.ones(len(zi)), (zi, ze[zi])), shape=(layout.n_param, n_exp))
        Ee = parts.map_reduce(functools.partial(_exposure_block, ze=ze, n_exp=n_exp)).tocsc()
        Eeg = np.asarray(Ze.T @ AZ)
        # Exposures without a free zero point: identity rows (never reached by r).
        empty = np.flatnonzero(Ee.diagonal() <= 0)
        Ee = (Ee + sp.csc_matrix((np.ones(len(empty)), (empty, empty)), shape=Ee.shape)).tocsc()
        lu = scipy.sparse.linalg.splu(Ee)
        Sc = Egg - Eeg.T @ lu.solve(Eeg)
        Sc = 0.5 * (Sc + Sc.T)
        return cls(Z, np.linalg.pinv(Sc, rcond=1e-12, hermitian=True), Ze, lu, Eeg)


def _exposure_block(part: _Part, ze: np.ndarray, n_exp: int) -> sp.csr_matrix:
    """This partition's ``Z_e^T S Z_e`` on the exposure aggregates: per
    exposure the weights of its observations in use, less their star-mean
    projections ``B D^-1 B^T`` (``B``: weight of each exposure-star pair)."""
    assert part.inv_w is not None
    zp = part.C.indices[part.C.indptr[:-1]]  # the first column of a row is its zero point
    e = ze[zp]
    wu = part.wu
    k = np.flatnonzero((wu > 0) & (e >= 0))
    star = part.prep.ix.star[k]
    w = wu[k]
    n_s = part.layout.n_star
    B = sp.csr_matrix((w, (e[k], star)), shape=(n_exp, n_s))
    W = sp.diags(np.bincount(e[k], weights=w, minlength=n_exp))
    return (W - B @ sp.diags(part.inv_w) @ B.T).tocsr()


def _coarse_basis(layout: UbercalLayout, free: np.ndarray) -> sp.csc_matrix:
    """Directions the data leave (almost) free and that a block-diagonal
    preconditioner cannot correct, restricted to the free parameters, one
    column each (empty columns dropped):

    * per quadrant (per focal plane with per-exposure zero points), its zero
      points up and its cells down by the same amount: an exact null direction
      of ``S``, fixed only by the cell prior;
    * the mean exposure gradient (x, y) against a tilt of every quadrant's
      starflat: told apart only by the variation within cells.
    """
    opt = layout.options
    nz, nq = layout.n_zp, layout.n_q
    rows: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    if opt.starflat:
        ncell = layout.n_cell_per_q
        cells = layout.n_zp + np.arange(layout.n_cell).reshape(nq, ncell)
        if opt.zp_mode == "exposure_quadrant":
            zps = np.arange(nz).reshape(-1, nq).T  # (nq, n_exp)
            groups = [(zps[q], cells[q]) for q in range(nq)]
        else:
            groups = [(np.arange(nz), cells.ravel())]
        for z, c in groups:
            rows.append(np.concatenate([z, c]))
            vals.append(np.concatenate([np.ones(len(z)), -np.ones(len(c))]))
        if opt.exposure_gradient:
            ncy, ncx = opt.grid
            g0, n_exp = layout.gradient_start, len(layout.expids)
            fx = np.tile((np.arange(ncx) + 0.5) / ncx - 0.5, ncy)
            fy = np.repeat((np.arange(ncy) + 0.5) / ncy - 0.5, ncx)
            for axis, f in ((0, fx), (1, fy)):
                rows.append(np.concatenate([g0 + 2 * np.arange(n_exp) + axis, cells.ravel()]))
                vals.append(np.concatenate([np.ones(n_exp), -np.tile(f, nq)]))
    cols = [np.full(len(r), i) for i, r in enumerate(rows)]
    if not rows:
        return sp.csc_matrix((layout.n_param, 0))
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    keep = free[r]
    Z = sp.csc_matrix((v[keep], (r[keep], c[keep])), shape=(layout.n_param, len(rows)))
    return Z[:, np.flatnonzero(np.diff(Z.indptr) > 0)]


def _pcg(
    apply: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    precond: Callable[[np.ndarray], np.ndarray],
    x0: np.ndarray,
    *,
    tol: float,
    max_iter: int,
) -> tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients for ``A x = b`` (b of shape (n,) or
    (n, k): k independent systems, one product per iteration for all); stops
    when every ``|r| <= tol |b|``. Returns (x, iterations)."""
    x = x0.copy()
    r = b - apply(x)
    z = precond(r)
    d = z.copy()
    rz = np.sum(r * z, axis=0)
    bn = np.sqrt(np.sum(b * b, axis=0))
    it = 0
    while it < max_iter:
        if np.all(np.sqrt(np.sum(r * r, axis=0)) <= tol * np.where(bn > 0, bn, 1.0)):
            break
        q = apply(d)
        dq = np.sum(d * q, axis=0)
        alpha = np.divide(rz, dq, out=np.zeros_like(rz), where=dq > 0)
        x += alpha * d
        r -= alpha * q
        z = precond(r)
        rz_new = np.sum(r * z, axis=0)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        d = z + beta * d
        rz = rz_new
        it += 1
    return x, it


@dataclass(frozen=True)
class IterativeResult:
    """What :func:`solve_iterative` hands to the solution's assembly.

    ``p`` and ``p_var`` in the final gauge (before the anchor offset), the
    per-star arrays over the layout's stars, the summed last pass statistics."""

    p: np.ndarray
    p_solve: np.ndarray
    p_var: np.ndarray
    flags: np.ndarray
    active: np.ndarray
    star_mag: np.ndarray
    star_weight: np.ndarray
    star_n: np.ndarray
    star_var_p: np.ndarray
    star_nobs: np.ndarray
    star_rms: np.ndarray
    star_rejected: np.ndarray
    stats: _PassStatistics
    n_free: int
    n_anchor: int
    chi2_prior: float
    mean_zp_err: float
    passes: int
    converged: bool
    cg_iterations: tuple[int, ...]  # per solve, the error estimate's last
    method: str


def solve_iterative(source: ObservationSource, layout: UbercalLayout) -> IterativeResult:
    """The outlier passes around the matrix-free solver (module docstring)."""
    opt = layout.options
    n_obs = source.map_reduce(len)
    # At least one partition per thread once there is enough to share.
    n_parts = max(1, math.ceil(n_obs / opt.partition_obs), min(opt.threads, n_obs // 250_000))
    parts = partition(source, layout, n_parts, threads=opt.threads)
    P = parameter_prior(layout)
    p: np.ndarray | None = None
    x = np.zeros(layout.n_param)
    passes = 0
    cg: list[int] = []  # iterations of each solve
    converged = False
    solved = None
    while True:
        final = passes + 1 > opt.max_iterations
        parts, sums = parts.map_sum(functools.partial(_pass, p=p, final=final))
        passes += 1
        counts = sums.stats.counts
        if solved is None:
            _require_usable(counts)
        if solved is not None:
            changed = counts["n_changed"]
            if not sums.n_newly and changed <= opt.clip_tolerance * counts["n_good"]:
                converged = True
                if changed and sums.rhs is not None:
                    solved = _solve_pass(parts, layout, sums, P, x, solved[2][3])
                    cg.append(solved[3])
                break
        if final:
            break
        solved = _solve_pass(parts, layout, sums, P, x, solved[2][3] if solved else None)
        x, p = solved[0], solved[1]
        cg.append(solved[3])
    if solved is None:
        raise UbercalError("max_iterations left no pass to solve")
    x, p, (active, free, flags, precond), _ = solved
    return _result(
        parts, layout, sums, x, p, active, free, flags, precond, P, passes, converged, cg
    )


def _solve_pass(
    parts: Partitions,
    layout: UbercalLayout,
    sums: _PassSums,
    P: sp.csr_matrix,
    x0: np.ndarray,
    previous: Any = None,
) -> tuple[np.ndarray, np.ndarray, tuple, int]:
    opt = layout.options
    blocks = sums.blocks
    assert blocks is not None
    assert sums.rhs is not None
    assert sums.components is not None
    diag_p = P.diagonal()
    diag_a = blocks.diag_a + diag_p
    diag_s = blocks.diag
    active = (diag_a > 0) & (diag_s + diag_p > 1e-9 * diag_a)
    if not active[: layout.n_zp].any():
        raise UbercalError("no zero point is constrained: no star is observed twice")
    _check_components(sums.components, layout, active)
    free = active & ~_gauge_pins(layout, active, diag_s + diag_p)
    apply = _masked_operator(parts, P, free)
    precond = _preconditioner(layout, blocks, P, free, apply, parts, previous)
    b = np.where(free, sums.rhs, 0.0)
    x, it = _pcg(
        apply,
        b,
        precond,
        np.where(free, np.nan_to_num(x0), 0.0),
        tol=opt.cg_tolerance,
        max_iter=opt.cg_max_iterations,
    )
    p = np.where(active, x, np.nan)
    return x, p, (active, free, prior_dominated(diag_s, P), precond), it


def _preconditioner(
    layout: UbercalLayout,
    blocks: _Blocks,
    P: sp.csr_matrix,
    free: np.ndarray,
    apply: Callable[[np.ndarray], np.ndarray],
    parts: Partitions,
    previous: Any = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """The ``preconditioner`` of the options (docs/ubercal.md has the
    measurements); the coarse part of ``previous`` is kept when it fits."""
    kind = layout.options.preconditioner
    smoother = _BlockJacobi.build(layout, blocks, P, free, kind)
    if kind not in ("two_level", "two_level_exposures"):
        return smoother
    if isinstance(previous, _TwoLevel) and np.array_equal(previous.free, free):
        return _TwoLevel(smoother, free, previous.coarse)
    coarse = _Coarse.build(layout, free, apply, parts if kind == "two_level_exposures" else None)
    return _TwoLevel(smoother, free, coarse)


def _masked_operator(
    parts: Partitions, P: sp.csr_matrix, free: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    mask = free.astype(np.float64)

    def apply(v: np.ndarray) -> np.ndarray:
        m = mask.reshape((-1,) + (1,) * (v.ndim - 1))
        vm = m * v
        return m * (parts.map_reduce(functools.partial(_apply, x=vm)) + P @ vm)

    return apply


def _check_components(comp: _Components, layout: UbercalLayout, active: np.ndarray) -> None:
    nz = layout.n_zp
    lab = comp.label
    keep = active[:nz] & (lab >= 0)
    uniq, counts = np.unique(lab[keep], return_counts=True)
    if len(uniq) <= 1:
        return
    zp_idx = np.flatnonzero(keep)
    comps = []
    for u in uniq[np.argsort(-counts, kind="stable")]:
        j = zp_idx[lab[keep] == u]
        if layout.options.zp_mode == "exposure_quadrant":
            comps.append((layout.expids[j // layout.n_q], layout.quadrants[j % layout.n_q]))
        else:
            comps.append((layout.expids[j], np.full(len(j), -1, dtype=np.int64)))
    raise DisconnectedGraphError(comps)


@dataclass(frozen=True)
class _StarResults:
    """Per-star results of partitions (summing collects them)."""

    pieces: tuple[tuple[int, dict[str, np.ndarray]], ...]

    def __add__(self, other: _StarResults) -> _StarResults:
        return _StarResults(self.pieces + other.pieces)

    def gather(self, name: str) -> np.ndarray:
        return np.concatenate([d[name] for _, d in sorted(self.pieces, key=lambda t: t[0])])


def _stars(part: _Part, p: np.ndarray, samples: np.ndarray) -> _StarResults:
    """Star magnitudes, weights, counts, repeatability, rejection, the
    zero-point part of the variance (from ``samples`` of the parameters), and
    the reference prior's chi2 terms, for this partition's stars."""
    lay = part.layout
    stats = part.stats
    assert stats is not None
    assert part.newly is not None
    star_mag, D = _star_magnitudes(part, p)
    inv_d = np.divide(1.0, D, out=np.zeros_like(D), where=D > 0)
    k = samples.shape[1]
    var_p = np.zeros(lay.n_star)
    for j in range(0, k, ERROR_BLOCK):
        block = samples[:, j : j + ERROR_BLOCK]
        proj = _star_sums(part, np.asarray(part.C @ block))
        proj += part.wp[:, None] * _anchor_values(part, block)
        var_p += np.sum(proj * proj, axis=1)
    if k:
        var_p *= inv_d**2 / k
    nobs = stats.star_nobs
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.maximum(nobs, 1)
        rms = np.sqrt(
            np.maximum(stats.star_r2 - stats.star_r1**2 / n, 0.0) / np.maximum(nobs - 1, 1)
        )
    rms = np.where(nobs >= 2, rms, np.nan)
    a = np.nan_to_num(p)[-1] if lay.n_anchor else 0.0
    chi2p = np.where(
        part.wp > 0, part.wp * (np.nan_to_num(star_mag) - part.mref - a * part.colp) ** 2, 0.0
    )
    star_n = np.bincount(part.prep.ix.star, weights=part.used, minlength=lay.n_star)
    return _StarResults(
        (
            (
                part.star_lo,
                {
                    "mag": star_mag,
                    "weight": D,
                    "var_p": var_p,
                    "nobs": nobs,
                    "rms": rms,
                    "rejected": part.rejected & ~part.newly,
                    "n": star_n,
                    "chi2_prior": chi2p,
                    "anchor": part.wp > 0,
                },
            ),
        )
    )


def _result(
    parts: Partitions,
    layout: UbercalLayout,
    sums: _PassSums,
    x: np.ndarray,
    p: np.ndarray,
    active: np.ndarray,
    free: np.ndarray,
    flags: np.ndarray,
    precond: Callable[[np.ndarray], np.ndarray],
    P: sp.csr_matrix,
    passes: int,
    converged: bool,
    cg: list[int],
) -> IterativeResult:
    opt = layout.options
    k = opt.error_samples if opt.compute_errors else 0
    p_var = np.full(layout.n_param, np.nan)
    samples = np.zeros((layout.n_param, 0))
    mean_zp_err = math.nan
    if k:
        # Solutions for simulated data noise have covariance (S + P)^-1 and, unlike
        # random probes, no component along the exact modes that the priors fix:
        # their spread is the error in the final gauge once transformed.
        apply = _masked_operator(parts, P, free)
        blocks, iterations = [], 0
        for b, j in enumerate(range(0, k, ERROR_BLOCK)):
            rhs = functools.partial(_noise_rhs, seed=opt.seed, k=min(ERROR_BLOCK, k - j), block=b)
            B = np.where(free[:, None], parts.map_reduce(rhs), 0.0)
            x, it = _pcg(
                apply, B, precond, precond(B), tol=opt.error_cg_tolerance,
                max_iter=opt.cg_max_iterations,
            )  # fmt: skip
            blocks.append(x)
            iterations = max(iterations, it)
            del B
        samples = np.concatenate(blocks, axis=1)
        del blocks
        cg.append(iterations)
        tx = _gauge_transform(samples, layout, active, centre_zp=False)
        zp_act = active[: layout.n_zp]
        mean_zp_err = float(np.std(tx[: layout.n_zp][zp_act].mean(axis=0), ddof=1))
        if not layout.n_anchor:
            tx = _gauge_transform(tx, layout, active, centre_zp=True)
        p_var = np.where(active, np.mean(tx * tx, axis=1), np.nan)
    stars = parts.map_reduce(functools.partial(_stars, p=p, samples=samples))
    p_final = _gauge_transform(p, layout, active, centre_zp=False)
    return IterativeResult(
        p=p_final,
        p_solve=p,
        p_var=p_var,
        flags=flags,
        active=active,
        star_mag=stars.gather("mag"),
        star_weight=stars.gather("weight"),
        star_n=stars.gather("n"),
        star_var_p=stars.gather("var_p") if opt.compute_errors else np.full(layout.n_star, np.nan),
        star_nobs=stars.gather("nobs").astype(np.int64),
        star_rms=stars.gather("rms"),
        star_rejected=stars.gather("rejected"),
        stats=sums.stats,
        n_free=int(free.sum()),
        n_anchor=int(stars.gather("anchor").sum()),
        chi2_prior=float(stars.gather("chi2_prior").sum()),
        mean_zp_err=mean_zp_err,
        passes=passes,
        converged=converged,
        cg_iterations=tuple(cg),
        method=f"pcg-{opt.preconditioner}",
    )
