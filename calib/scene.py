"""Scene-modelling photometry of a transient (seed 004; docs/lightcurves.md).

Every image ``i`` of the transient's field (a stamp of one quadrant of one
exposure; an exposure may give several when the stamp crosses a quadrant
boundary) is modelled at once as::

    I_i(p) = alpha_i [ F_e(i) P_i(p - phi_i(x_sn)) + sum_j G_j P_i(p - phi_i(u_j)) ] + s_i

- ``F_e`` the transient's flux in epoch (exposure) ``e``, nJy;
- ``G_j`` the static scene (host galaxy, and any star in the stamp) on a grid of
  nodes ``u_j`` one reference pixel apart, nJy per node: each node is a point
  source, so the kernel that brings ``G`` to image ``i``'s PSF is ``P_i`` itself;
- ``P_i`` the image's PSF measured on its stars (:mod:`calib.psf`);
- ``alpha_i`` its photometric scale, e- per nJy, from the ubercal zero point and
  starflat: ``EXPTIME 10**(0.4 (zp + dzp - 31.4))``;
- ``phi_i`` the relative astrometry, reference frame -> image pixels (affine,
  from the WCS);
- ``s_i`` a sky per image.

The unknowns ``(F, s, G, x_sn)`` are fitted by weighted least squares: the
model is linear in all but the position, which Gauss-Newton iterations update.
Weights are inverse variances from the model (photon noise of the model, not of
the noisy pixel, which would bias bright sources low), after a first pass with
the data's variance; pixels more than ``clip_sigma`` off are dropped once.

Gauge. Three exact degeneracies are fixed by linear constraints (KKT system):

- *galaxy vs sky*: a constant added to ``G`` adds a constant to every image,
  which the skies absorb; the nodes on the grid's border sum to zero (so ``G``
  carries no sky pedestal, which the finite grid would render imperfectly at
  the data's edges);
- *galaxy vs flux*: a point added to ``G`` at the transient and removed from
  every ``F_e`` leaves the model unchanged; the flux is zero on average over
  the *baseline* epochs (before the explosion, or after the transient faded),
  whose fluxes stay free, so that they can be checked against zero
  (``baseline_mode='mean_zero'``), or each baseline flux is held at zero
  (``'fixed_zero'``, as DES-SMP does);
- *galaxy high frequencies*: the PSFs leave the grid's shortest wavelengths
  nearly unconstrained; a first-difference (smoothness) penalty of strength
  ``regularisation`` times the data's typical weight per node fills them, and
  the nodes outside the data, which see only PSF wings.

Errors come from the full covariance (the regularised solution's sandwich
``S N S``, ``S`` the constrained inverse), position included; the zero points'
errors are propagated through the same solve (an error in ``alpha_i`` moves
``G``, hence every epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import linalg

from calib.psf import PSFModel

__all__ = [
    "AffineMap",
    "SceneFit",
    "SceneFitOptions",
    "SceneImage",
    "choose_baseline",
    "fit_scene",
]


@dataclass(frozen=True)
class AffineMap:
    """Reference-frame coordinates ``(u, v)`` -> image pixels ``(x, y)``:
    ``(x, y) = offset + matrix @ (u, v)``."""

    matrix: np.ndarray  # (2, 2)
    offset: np.ndarray  # (2,)

    def __call__(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, o = self.matrix, self.offset
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        return o[0] + m[0, 0] * u + m[0, 1] * v, o[1] + m[1, 0] * u + m[1, 1] * v

    def inverse(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(self.matrix)
        dx, dy = np.asarray(x) - self.offset[0], np.asarray(y) - self.offset[1]
        return inv[0, 0] * dx + inv[0, 1] * dy, inv[1, 0] * dx + inv[1, 1] * dy


@dataclass(frozen=True, eq=False)
class SceneImage:
    """One stamp of one exposure.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), e-
        Fluence (sky included).
    variance : ndarray, shape (ny, nx), e-^2
    good : ndarray of bool, shape (ny, nx)
        Usable pixels.
    photon_scale : ndarray, shape (ny, nx), or float
        ``k`` in ``variance = k * signal + k^2 read_noise^2`` (flat and pixel
        area make it differ from 1), for the model variance.
    read_noise_e : float
    x0, y0 : int
        Image pixel of ``data[0, 0]`` (the PSF model's coordinates).
    psf : PSFModel
    alpha : float
        e- per nJy.
    to_image : AffineMap
        Reference frame -> image pixels.
    epoch : int
        Index of the exposure (the flux) the stamp belongs to.
    alpha_err_mag : float
        Error of the zero point behind ``alpha`` (propagated to the fluxes).
    """

    data: np.ndarray
    variance: np.ndarray
    good: np.ndarray
    photon_scale: np.ndarray | float
    read_noise_e: float
    x0: int
    y0: int
    psf: PSFModel
    alpha: float
    to_image: AffineMap
    epoch: int
    alpha_err_mag: float = 0.0


@dataclass(frozen=True)
class SceneFitOptions:
    """Settings of :func:`fit_scene` (every field is written into the outputs).

    Attributes
    ----------
    galaxy : bool
        Model a static scene on a grid (False: a point source and a sky per
        image only, as for calibration stars).
    grid_margin_fwhm : float
        Nodes reach this many FWHM (the broadest image's) beyond the data: a
        point source farther out puts < 2 % of its light (Moffat beta = 3.5)
        on the data's edge, where the outer nodes and the sky absorb it.
    regularisation : float
        First-difference penalty on the grid, relative to the median data weight
        of a node.
    fit_position : bool
        Fit the transient's position (shared by all images) when its summed S/N
        reaches ``position_min_snr``; otherwise it stays where given.
    position_min_snr : float
    max_iterations : int
        Gauss-Newton iterations per weighting.
    position_tolerance_px : float
        Converged when the position moves less than this.
    max_step_px : float
        Largest position step per iteration.
    clip_sigma : float
        Pixels this many sigma off the first model are dropped (cosmic rays).
    model_variance : bool
        Weight with the model's variance after the first pass.
    baseline_mode : {'mean_zero', 'fixed_zero'}
        How the baseline epochs fix the galaxy/flux gauge.
    """

    galaxy: bool = True
    grid_margin_fwhm: float = 2.5
    regularisation: float = 1e-3
    fit_position: bool = True
    position_min_snr: float = 20.0
    max_iterations: int = 8
    position_tolerance_px: float = 1e-3
    max_step_px: float = 0.5
    clip_sigma: float = 5.0
    model_variance: bool = True
    baseline_mode: Literal["mean_zero", "fixed_zero"] = "mean_zero"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class SceneFit:
    """Result of :func:`fit_scene`.

    Attributes
    ----------
    flux_njy : ndarray, shape (n_epochs,)
        Transient flux per epoch; NaN for epochs without usable pixels.
    flux_err_njy : ndarray, shape (n_epochs,)
        Total error: statistical (full covariance) and zero points.
    flux_err_stat_njy : ndarray, shape (n_epochs,)
    flux_cov : ndarray, shape (n_epochs, n_epochs)
        Total covariance (epochs share the galaxy, hence correlated errors).
    position, position_err : ndarray, shape (2,)
        Transient position in the reference frame and its error.
    position_fitted : bool
    sky : ndarray, shape (n_images,), e-
        Per image.
    galaxy : ndarray, shape (gy, gx), nJy per node
        The static scene (its border sums to zero: the skies carry the
        constant); empty without a galaxy.
    grid_origin : tuple of int
        Frame coordinates of ``galaxy[0, 0]``.
    chi2, dof : float
        Of the final weighted fit.
    chi2_image, npix_image : ndarray, shape (n_images,)
    n_clipped : int
        Pixels dropped as outliers.
    iterations : int
    converged : bool
    baseline : ndarray of bool, shape (n_epochs,)
        The epochs that fixed the galaxy/flux gauge.
    """

    flux_njy: np.ndarray
    flux_err_njy: np.ndarray
    flux_err_stat_njy: np.ndarray
    flux_cov: np.ndarray
    position: np.ndarray
    position_err: np.ndarray
    position_fitted: bool
    sky: np.ndarray
    galaxy: np.ndarray
    grid_origin: tuple[int, int]
    chi2: float
    dof: float
    chi2_image: np.ndarray
    npix_image: np.ndarray
    n_clipped: int
    iterations: int
    converged: bool
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def chi2_dof(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else float("nan")


# --- building blocks -----------------------------------------------------------------


@dataclass(eq=False)
class _Pixels:
    """The usable pixels of one image, flattened."""

    x: np.ndarray  # (n,) image pixel coordinates
    y: np.ndarray
    data: np.ndarray
    var_data: np.ndarray
    k: np.ndarray
    keep: np.ndarray  # (n,) bool: not clipped
    basis: np.ndarray | None = None  # (n, n_nodes): alpha * P_i at each node


def _pixels(img: SceneImage) -> _Pixels:
    ny, nx = img.data.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ok = (
        np.asarray(img.good, bool)
        & np.isfinite(img.data)
        & np.isfinite(img.variance)
        & (img.variance > 0)
    )
    k = np.broadcast_to(np.asarray(img.photon_scale, dtype=np.float64), img.data.shape)
    return _Pixels(
        x=(xx[ok] + img.x0).astype(np.float64),
        y=(yy[ok] + img.y0).astype(np.float64),
        data=img.data[ok].astype(np.float64),
        var_data=img.variance[ok].astype(np.float64),
        k=k[ok].astype(np.float64),
        keep=np.ones(int(ok.sum()), bool),
    )


def _grid(images: list[SceneImage], pixels: list[_Pixels], margin_fwhm: float):
    """Integer frame nodes covering every image's data plus a margin."""
    lo, hi = np.array([np.inf, np.inf]), np.array([-np.inf, -np.inf])
    fwhm = 0.0
    for img, px in zip(images, pixels, strict=True):
        if not len(px.x):
            continue
        u, v = img.to_image.inverse(px.x, px.y)
        lo = np.minimum(lo, [u.min(), v.min()])
        hi = np.maximum(hi, [u.max(), v.max()])
        fwhm = max(fwhm, float(img.psf.params_at(float(px.x.mean()), float(px.y.mean()))[0]))
    m = int(np.ceil(margin_fwhm * fwhm))
    u0, v0 = int(np.floor(lo[0])) - m, int(np.floor(lo[1])) - m
    u1, v1 = int(np.ceil(hi[0])) + m, int(np.ceil(hi[1])) + m
    return (u0, v0), (v1 - v0 + 1, u1 - u0 + 1)


def _first_differences(shape: tuple[int, int]) -> np.ndarray:
    """Graph Laplacian (n, n) of the 4-neighbour grid: ``G^T L G`` is the sum of
    squared differences of neighbouring nodes."""
    gy, gx = shape
    n = gy * gx
    idx = np.arange(n).reshape(gy, gx)
    lap = np.zeros((n, n))
    for a, b in (
        (idx[:, :-1].ravel(), idx[:, 1:].ravel()),
        (idx[:-1, :].ravel(), idx[1:, :].ravel()),
    ):
        np.add.at(lap, (a, a), 1.0)
        np.add.at(lap, (b, b), 1.0)
        np.add.at(lap, (a, b), -1.0)
        np.add.at(lap, (b, a), -1.0)
    return lap


@dataclass(frozen=True)
class _Layout:
    n_epochs: int
    n_images: int
    n_nodes: int
    fit_position: bool

    @property
    def sky0(self) -> int:
        return self.n_epochs

    @property
    def g0(self) -> int:
        return self.n_epochs + self.n_images

    @property
    def pos0(self) -> int:
        return self.g0 + self.n_nodes

    @property
    def n(self) -> int:
        return self.pos0 + (2 if self.fit_position else 0)


@dataclass(frozen=True)
class _Gauge:
    """The constraints as an elimination ``theta = Z theta'``: parameters held at
    zero are dropped, and each sum-zero group's first parameter is minus the sum
    of the others (the baseline fluxes; the galaxy's border nodes)."""

    keep: np.ndarray  # (n',) full indices of the free parameters
    heads: np.ndarray  # (g,) eliminated parameter of each group
    w: np.ndarray  # (g, n') 1 where the free parameter is in group g
    n: int

    def reduce(self, mat: np.ndarray, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Z^T M Z`` and ``Z^T v``."""
        k, h, w = self.keep, self.heads, self.w
        red = mat[np.ix_(k, k)]
        rhs = vec[k]
        if len(h):
            c = mat[np.ix_(k, h)]  # (n', g)
            red = red - c @ w - w.T @ c.T + w.T @ mat[np.ix_(h, h)] @ w
            rhs = rhs - w.T @ vec[h]
        return red, rhs

    def expand(self, reduced: np.ndarray) -> np.ndarray:
        """``Z theta'`` (reduced may have trailing columns)."""
        out = np.zeros((self.n, *reduced.shape[1:]))
        out[self.keep] = reduced
        if len(self.heads):
            out[self.heads] = -np.tensordot(self.w, reduced, axes=(1, 0))
        return out

    def transpose_apply(self, e: np.ndarray) -> np.ndarray:
        """``Z^T E`` for full-size vectors (n, k) -> (n', k)."""
        out = e[self.keep]
        if len(self.heads):
            out = out - self.w.T @ e[self.heads]
        return out


@dataclass(frozen=True, eq=False)
class _Solution:
    theta: np.ndarray  # (n,)
    normal: np.ndarray  # (n, n) data part of the normal matrix
    factor: tuple  # Cholesky of the reduced, regularised matrix
    gauge: _Gauge

    def operator_columns(self, columns: np.ndarray) -> np.ndarray:
        """Columns (n, k) of the constrained inverse ``S = Z (Z^T (N + R) Z)^-1 Z^T``
        (symmetric) for parameter indices."""
        y = linalg.cho_solve(self.factor, self.gauge.transpose_apply(_unit(self.gauge.n, columns)))
        return self.gauge.expand(y)

    def effective_parameters(self) -> float:
        """``tr(S N)``: what the fit spends of the data's degrees of freedom (a
        regularised node the data barely see counts for little)."""
        red, _ = self.gauge.reduce(self.normal, np.zeros(self.gauge.n))
        c, lower = self.factor
        inv, info = linalg.lapack.dpotri(c, lower=lower)
        if info != 0:
            return float("nan")
        # dpotri fills one triangle: tr(A B) = sum(A * B) for symmetric A, B.
        tri = np.tril(inv) if lower else np.triu(inv)
        full = tri + tri.T - np.diag(np.diag(tri))
        return float(np.sum(full * red))


def _unit(n: int, columns: np.ndarray) -> np.ndarray:
    e = np.zeros((n, len(columns)))
    e[columns, np.arange(len(columns))] = 1.0
    return e


class _Problem:
    """The images, their pixels and the grid; builds and solves the normal equations."""

    def __init__(
        self,
        images: list[SceneImage],
        n_epochs: int,
        options: SceneFitOptions,
    ) -> None:
        self.images = images
        self.options = options
        self.pixels = [_pixels(img) for img in images]
        self.epochs_seen = np.zeros(n_epochs, bool)
        for img, px in zip(images, self.pixels, strict=True):
            if len(px.x):
                self.epochs_seen[img.epoch] = True
        if options.galaxy:
            self.grid_origin, self.grid_shape = _grid(images, self.pixels, options.grid_margin_fwhm)
            gy, gx = self.grid_shape
            vv, uu = np.mgrid[0:gy, 0:gx]
            self.node_u = (uu.ravel() + self.grid_origin[0]).astype(np.float64)
            self.node_v = (vv.ravel() + self.grid_origin[1]).astype(np.float64)
            for img, px in zip(images, self.pixels, strict=True):
                xj, yj = img.to_image(self.node_u, self.node_v)
                px.basis = img.alpha * np.asarray(
                    img.psf.evaluate(px.x[:, None], px.y[:, None], xj[None, :], yj[None, :])
                )
            self.laplacian = _first_differences(self.grid_shape)
        else:
            self.grid_origin, self.grid_shape = (0, 0), (0, 0)
            self.node_u = self.node_v = np.zeros(0)
        self.n_epochs = n_epochs
        self._galaxy_cache: tuple | None = None

    def layout(self, fit_position: bool) -> _Layout:
        return _Layout(self.n_epochs, len(self.images), len(self.node_u), fit_position)

    # -- model -------------------------------------------------------------------
    def columns(
        self, i: int, pos: np.ndarray, flux: float, layout: _Layout
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense design block of image ``i`` over its point-source, sky and
        position columns, and their parameter indices."""
        img, px = self.images[i], self.pixels[i]
        xt, yt = img.to_image(pos[0], pos[1])
        p, dpx, dpy = img.psf.evaluate(px.x, px.y, xt, yt, derivatives=True)
        cols = [img.alpha * p, np.ones(len(px.x))]
        index = [img.epoch, layout.sky0 + i]
        if layout.fit_position:
            m = img.to_image.matrix
            # d model / d(u, v) = alpha F grad P . d(x, y)/d(u, v)
            cols.append(img.alpha * flux * (dpx * m[0, 0] + dpy * m[1, 0]))
            cols.append(img.alpha * flux * (dpx * m[0, 1] + dpy * m[1, 1]))
            index += [layout.pos0, layout.pos0 + 1]
        return np.column_stack(cols), np.array(index)

    def model(self, i: int, theta: np.ndarray, pos: np.ndarray, layout: _Layout) -> np.ndarray:
        """Model of image ``i``'s pixels (sky included) at parameters ``theta``."""
        img, px = self.images[i], self.pixels[i]
        xt, yt = img.to_image(pos[0], pos[1])
        out = img.alpha * theta[img.epoch] * img.psf.evaluate(px.x, px.y, xt, yt)
        out = out + theta[layout.sky0 + i]
        if px.basis is not None:
            out = out + px.basis @ theta[layout.g0 : layout.pos0]
        return np.asarray(out)

    # -- normal equations ----------------------------------------------------------
    def galaxy_block(self, weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``B^T W B`` and ``B^T W d`` of the grid (n_nodes, n_nodes), (n_nodes,):
        the costly part, which depends on the weights only (cached per weighting)."""
        key = tuple(id(w) for w in weights)
        if self._galaxy_cache is not None and self._galaxy_cache[0] == key:
            return self._galaxy_cache[1], self._galaxy_cache[2]
        stacked, rhs = [], np.zeros(len(self.node_u))
        for px, w in zip(self.pixels, weights, strict=True):
            if px.basis is None or not len(px.x):
                continue
            sw = np.sqrt(w)
            bw = px.basis * sw[:, None]
            rhs += bw.T @ (px.data * sw)
            stacked.append(bw)
        block = linalg.blas.dsyrk(1.0, np.concatenate(stacked), trans=1, lower=0)
        block = np.triu(block) + np.triu(block, 1).T  # dsyrk fills one triangle
        self._galaxy_cache = (key, block, rhs)
        return block, rhs

    def normal_equations(
        self, weights: list[np.ndarray], pos: np.ndarray, flux: np.ndarray, layout: _Layout
    ) -> tuple[np.ndarray, np.ndarray]:
        """``N = A^T W A`` and ``b = A^T W d`` (no regularisation)."""
        n = layout.n
        normal = np.zeros((n, n))
        rhs = np.zeros(n)
        g = slice(layout.g0, layout.pos0)
        for i, (img, px, w) in enumerate(zip(self.images, self.pixels, weights, strict=True)):
            if not len(px.x):
                continue
            a, idx = self.columns(i, pos, float(flux[img.epoch]), layout)
            sw = np.sqrt(w)
            aw = a * sw[:, None]
            dw = px.data * sw
            normal[np.ix_(idx, idx)] += aw.T @ aw
            rhs[idx] += aw.T @ dw
            if px.basis is not None:
                cross = aw.T @ (px.basis * sw[:, None])
                normal[idx, g] += cross
                normal[g, idx] += cross.T
        if layout.n_nodes:
            block, grhs = self.galaxy_block(weights)
            normal[g, g] += block
            rhs[g] += grhs
        return normal, rhs

    def gauge(self, baseline: np.ndarray, layout: _Layout) -> _Gauge:
        """The constraints as an elimination: parameters no pixel sees are held
        at zero; with a galaxy, its border nodes sum to zero (galaxy vs sky) and
        the baseline fluxes sum to zero, or are each zero (galaxy vs flux)."""
        held = [layout.sky0 + i for i, px in enumerate(self.pixels) if not len(px.x)]
        held += list(np.flatnonzero(~self.epochs_seen))
        groups: list[np.ndarray] = []
        if self.options.galaxy:
            gy, gx = self.grid_shape
            ring = np.zeros((gy, gx), bool)
            ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
            groups.append(layout.g0 + np.flatnonzero(ring.ravel()))
            b = np.flatnonzero(baseline & self.epochs_seen)
            if self.options.baseline_mode == "fixed_zero" or len(b) == 1:
                held += list(b)
            else:
                groups.append(b)
        heads = np.array([int(g[0]) for g in groups], dtype=np.int64)
        drop = {int(h) for h in held} | set(heads.tolist())
        keep = np.array([k for k in range(layout.n) if k not in drop], dtype=np.int64)
        w = np.zeros((len(groups), len(keep)))
        for j, g in enumerate(groups):
            w[j] = np.isin(keep, g[1:])
        return _Gauge(keep=keep, heads=heads, w=w, n=layout.n)

    def solve(
        self,
        weights: list[np.ndarray],
        pos: np.ndarray,
        flux: np.ndarray,
        layout: _Layout,
        baseline: np.ndarray,
    ) -> _Solution:
        """Normal equations at ``pos`` (position columns linearised at ``flux``),
        regularised and solved under the gauge constraints (Cholesky)."""
        normal, rhs = self.normal_equations(weights, pos, flux, layout)
        gauge = self.gauge(baseline, layout)
        red, red_rhs = gauge.reduce(normal + self.regularisation(normal, layout), rhs)
        try:
            factor = linalg.cho_factor(red, check_finite=False)
        except linalg.LinAlgError:
            raise ValueError(
                "the scene's normal equations are singular: an epoch, sky or position "
                "without constraining pixels"
            ) from None
        theta = gauge.expand(linalg.cho_solve(factor, red_rhs, check_finite=False))
        return _Solution(theta, normal, factor, gauge)

    def regularisation(self, normal: np.ndarray, layout: _Layout) -> np.ndarray:
        reg = np.zeros_like(normal)
        if self.options.galaxy and layout.n_nodes:
            g = slice(layout.g0, layout.pos0)
            diag = np.diag(normal)[g]
            scale = float(np.median(diag[diag > 0])) if np.any(diag > 0) else 1.0
            reg[g, g] = self.options.regularisation * scale * self.laplacian
        return reg


def fit_scene(
    images: list[SceneImage],
    position: tuple[float, float],
    *,
    n_epochs: int,
    baseline: np.ndarray | None = None,
    options: SceneFitOptions | None = None,
) -> SceneFit:
    """Fit the scene model to all images of one source in one band.

    Parameters
    ----------
    images : list of SceneImage
    position : (u, v)
        Starting position of the transient in the reference frame.
    n_epochs : int
        Number of fluxes (``image.epoch`` indexes them).
    baseline : ndarray of bool, shape (n_epochs,), optional
        Epochs without transient light, which fix the galaxy/flux gauge.
        Required with a galaxy (:func:`choose_baseline` finds them when they
        are not known); ignored without one.
    options : SceneFitOptions, optional

    Returns
    -------
    SceneFit

    Raises
    ------
    ValueError
        Bad inputs: no images, epochs out of range, a galaxy without baseline
        epochs.
    """
    opt = options or SceneFitOptions()
    if not images:
        raise ValueError("images is empty: nothing to fit")
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    for i, img in enumerate(images):
        if not 0 <= img.epoch < n_epochs:
            raise ValueError(f"images[{i}].epoch = {img.epoch} is outside 0..{n_epochs - 1}")
        if img.data.shape != img.variance.shape or img.data.shape != np.shape(img.good):
            raise ValueError(f"images[{i}]: data, variance and good must have one shape")
        if not img.alpha > 0:
            raise ValueError(f"images[{i}].alpha must be > 0 e-/nJy, got {img.alpha}")
    baseline = np.zeros(n_epochs, bool) if baseline is None else np.asarray(baseline, bool)
    if baseline.shape != (n_epochs,):
        raise ValueError(f"baseline must have shape ({n_epochs},), got {baseline.shape}")
    prob = _Problem(images, n_epochs, opt)
    if opt.galaxy and not np.any(baseline & prob.epochs_seen):
        raise ValueError(
            "a scene with a galaxy needs baseline epochs (no transient light) with data "
            "to fix the galaxy/flux gauge"
        )
    return _fit(prob, np.asarray(position, dtype=np.float64), baseline)


def _weights(prob: _Problem, models: list[np.ndarray] | None) -> list[np.ndarray]:
    """Inverse variances: the data's, or the models' photon + read noise."""
    out = []
    for i, px in enumerate(prob.pixels):
        if models is None:
            var = px.var_data
        else:
            rn2 = prob.images[i].read_noise_e ** 2
            var = px.k * np.clip(models[i], 0.0, None) + px.k**2 * rn2
            var = np.where(var > 0, var, px.var_data)
        out.append(np.where(px.keep, 1.0 / var, 0.0))
    return out


def _fit(prob: _Problem, pos: np.ndarray, baseline: np.ndarray) -> SceneFit:
    opt = prob.options
    ne = prob.n_epochs
    weights = _weights(prob, None)
    held = prob.layout(False)
    sol = prob.solve(weights, pos, np.zeros(ne), held, baseline)
    # Fit the position only if the transient shows: summed S/N of the fluxes.
    x = sol.operator_columns(np.arange(ne))
    var = np.diag(x.T @ sol.normal @ x)
    ok = prob.epochs_seen & (var > 0)
    snr = float(np.sqrt(np.sum(sol.theta[:ne][ok] ** 2 / var[ok])))
    fit_position = opt.fit_position and snr >= opt.position_min_snr
    layout = prob.layout(fit_position)
    theta = sol.theta[: held.pos0]
    iterations, converged, n_clipped = 1, True, 0
    for stage in ("data variance", "model variance"):
        if stage == "model variance":
            models = [prob.model(i, theta, pos, layout) for i in range(len(prob.images))]
            n_clipped += _clip(prob, models, weights, opt.clip_sigma)
            weights = _weights(prob, models if opt.model_variance else None)
        if not fit_position:
            theta = prob.solve(weights, pos, theta[:ne], layout, baseline).theta
            iterations += 1
            continue
        converged = False
        for _ in range(opt.max_iterations):
            sol = prob.solve(weights, pos, theta[:ne], layout, baseline)
            iterations += 1
            theta = sol.theta[: layout.pos0]
            step = sol.theta[layout.pos0 :]
            size = float(np.hypot(*step))
            pos = pos + step * min(1.0, opt.max_step_px / max(size, 1e-12))
            if size < opt.position_tolerance_px:
                converged = True
                break
    return _result(prob, weights, pos, theta, layout, baseline, n_clipped, iterations, converged)


def _clip(prob: _Problem, models: list[np.ndarray], weights: list[np.ndarray], sigma: float) -> int:
    """Drop pixels more than ``sigma`` off the model; returns how many."""
    if sigma <= 0:
        return 0
    n = 0
    for px, m, w in zip(prob.pixels, models, weights, strict=True):
        bad = px.keep & (np.abs((px.data - m) * np.sqrt(w)) > sigma)
        px.keep &= ~bad
        n += int(bad.sum())
    return n


def _calibration_covariance(
    prob: _Problem,
    sol: _Solution,
    f_columns: np.ndarray,
    weights: list[np.ndarray],
    pos: np.ndarray,
    layout: _Layout,
) -> np.ndarray:
    """Covariance of the fluxes from the zero points' errors: image ``i``'s data
    scaled by ``(1 + d_i)`` moves the solution by ``S A_i^T W_i (m_i - s_i) d_i``."""
    ne = prob.n_epochs
    theta = sol.theta
    sig = np.array([0.4 * math.log(10.0) * img.alpha_err_mag for img in prob.images])
    resp = np.zeros((layout.n, len(prob.images)))
    for i, (img, px, w) in enumerate(zip(prob.images, prob.pixels, weights, strict=True)):
        if not len(px.x) or not sig[i] > 0:
            continue
        light = w * (prob.model(i, theta, pos, layout) - theta[layout.sky0 + i])
        a, idx = prob.columns(i, pos, float(theta[img.epoch]), layout)
        resp[idx, i] += a.T @ light
        if px.basis is not None:
            resp[layout.g0 : layout.pos0, i] += px.basis.T @ light
    sig = np.where(sig > 0, sig, 0.0)
    # S is symmetric, so the flux rows of S V are f_columns^T V.
    dflux = f_columns[:, :ne].T @ resp  # (n_epochs, n_images)
    return (dflux * sig**2) @ dflux.T


def _result(
    prob: _Problem,
    weights: list[np.ndarray],
    pos: np.ndarray,
    theta: np.ndarray,
    layout: _Layout,
    baseline: np.ndarray,
    n_clipped: int,
    iterations: int,
    converged: bool,
) -> SceneFit:
    """Final solve at the converged position (position free, for its covariance),
    errors and chi^2."""
    ne = prob.n_epochs
    sol = prob.solve(weights, pos, theta[:ne], layout, baseline)
    theta = sol.theta
    idx = np.arange(ne)
    if layout.fit_position:
        idx = np.concatenate([idx, [layout.pos0, layout.pos0 + 1]])
    x = sol.operator_columns(idx)
    stat = x.T @ sol.normal @ x
    cal = _calibration_covariance(prob, sol, x, weights, pos, layout)
    total = stat[:ne, :ne] + cal
    err_stat = np.sqrt(np.clip(np.diag(stat)[:ne], 0.0, None))
    err = np.sqrt(np.clip(np.diag(total), 0.0, None))
    perr = (
        np.sqrt(np.clip(np.diag(stat)[ne:], 0.0, None))
        if layout.fit_position
        else np.full(2, np.nan)
    )
    chi2_img = np.zeros(len(prob.images))
    npix = np.zeros(len(prob.images), dtype=np.int64)
    for i, (px, w) in enumerate(zip(prob.pixels, weights, strict=True)):
        if len(px.x):
            r = px.data - prob.model(i, theta, pos, layout)
            chi2_img[i] = float(np.sum(w * r * r))
            npix[i] = int(px.keep.sum())
    n_free = sol.effective_parameters()
    gy, gx = prob.grid_shape
    seen = prob.epochs_seen
    return SceneFit(
        flux_njy=np.where(seen, theta[:ne], np.nan),
        flux_err_njy=np.where(seen, err, np.nan),
        flux_err_stat_njy=np.where(seen, err_stat, np.nan),
        flux_cov=total,
        position=pos,
        position_err=perr,
        position_fitted=layout.fit_position,
        sky=theta[layout.sky0 : layout.g0].copy(),
        galaxy=theta[layout.g0 : layout.pos0].reshape(gy, gx),
        grid_origin=prob.grid_origin,
        chi2=float(chi2_img.sum()),
        dof=float(npix.sum() - n_free),
        chi2_image=chi2_img,
        npix_image=npix,
        n_clipped=n_clipped,
        iterations=iterations,
        converged=converged,
        baseline=baseline & seen,
    )


def choose_baseline(
    flux: np.ndarray,
    flux_err: np.ndarray,
    *,
    clip_sigma: float = 3.0,
    start_fraction: float = 0.25,
    min_epochs: int = 2,
) -> np.ndarray:
    """Baseline epochs when none are known: the faintest plateau.

    ``flux`` are fluxes from a fit whose gauge is arbitrary (e.g. mean zero over
    all epochs): their differences are right, their zero is not. Starting from
    the faintest ``start_fraction`` of the epochs, the plateau is the set of
    epochs within ``clip_sigma`` (above) of its own weighted mean, iterated to a
    fixed point. Before an explosion, or after the transient faded, that is the
    epochs without its light; epochs of a barely started rise fall into it too
    (a bias towards low fluxes of at most ``clip_sigma`` of their errors).

    Returns
    -------
    ndarray of bool, shape (n_epochs,)
        All False when fewer than ``min_epochs`` epochs have a finite flux.
    """
    flux, err = np.asarray(flux, np.float64), np.asarray(flux_err, np.float64)
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    chosen = np.zeros(len(flux), bool)
    if ok.sum() < min_epochs:
        return chosen
    idx = np.flatnonzero(ok)
    n0 = max(min_epochs, int(np.ceil(start_fraction * len(idx))))
    chosen[idx[np.argsort(flux[idx])[:n0]]] = True
    for _ in range(50):
        w = 1.0 / err[chosen] ** 2
        level = float(np.sum(w * flux[chosen]) / np.sum(w))
        new = ok & (flux - level <= clip_sigma * err)
        if np.array_equal(new, chosen) or new.sum() < min_epochs:
            break
        chosen = new
    return chosen
