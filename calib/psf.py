"""PSF models measured on an image's own stars (docs/lightcurves.md).

The model is an elliptical Moffat profile whose width and ellipticity vary
linearly over the image, with the Moffat index as a free parameter that
includes the Gaussian limit::

    p(x, y) = (1 + t (2**u - 1))**(-1 / u),   t = q(dx, dy) / (fwhm / 2)**2

``u = 1 / beta`` (``u -> 0`` is a Gaussian of the same FWHM, so one family
covers both shapes and the fit decides), ``q`` the quadratic form of the
ellipticity ``(e1, e2)`` with unit determinant. The profile is normalised by its
analytic integral, so a source of flux ``f`` puts ``f * psf`` in the pixels;
sampling is at pixel centres (``oversample=1``, as the simulator renders) or a
pixel-integrated average over ``oversample**2`` sub-pixels.

:func:`fit_psf` measures the parameters from stamps of isolated stars by
non-linear least squares, the stars' fluxes and local skies solved linearly
inside it; stars whose fit is an outlier (an unflagged neighbour, a cosmic ray)
are rejected and the fit repeated.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, least_squares

__all__ = ["PSFFitError", "PSFModel", "fit_psf", "fit_psf_stamps"]

_LN2 = math.log(2.0)
_U_MAX = 0.8
"""Largest 1 / beta fitted (beta = 1.25: wings heavier than any seeing profile)."""


class PSFFitError(ValueError):
    """Too few usable stars, or a fit that did not converge."""


@dataclass(frozen=True)
class PSFModel:
    """An elliptical Moffat PSF varying linearly over an image.

    Attributes
    ----------
    fwhm_px : float
        FWHM at the reference point, pixels.
    inv_beta : float
        ``1 / beta``; 0 is a Gaussian.
    e1, e2 : float
        Ellipticity at the reference point (``e1 > 0`` elongates along x).
    gradient : ndarray, shape (3, 2)
        Change of (fwhm_px, e1, e2) per pixel along (x, y).
    x_ref, y_ref : float
        Reference point, image pixels (0-based).
    oversample : int
        1: sampled at pixel centres; n > 1: averaged over n x n sub-pixels.
    support_fwhm : float
        Light beyond this many FWHM of the centre is left out (``< 1e-4`` of it
        for beta >= 2.5).
    n_stars : int
        Stars the fit kept.
    chi2_dof : float
        Reduced chi^2 of the kept stars' stamps.
    """

    fwhm_px: float
    inv_beta: float
    e1: float
    e2: float
    gradient: np.ndarray
    x_ref: float
    y_ref: float
    oversample: int = 1
    support_fwhm: float = 4.0
    n_stars: int = 0
    chi2_dof: float = float("nan")

    def params_at(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """(fwhm_px, e1, e2) at image positions, each shaped like ``x``."""
        dx, dy = np.asarray(x) - self.x_ref, np.asarray(y) - self.y_ref
        g = self.gradient
        fwhm = self.fwhm_px + g[0, 0] * dx + g[0, 1] * dy
        e1 = self.e1 + g[1, 0] * dx + g[1, 1] * dy
        e2 = self.e2 + g[2, 0] * dx + g[2, 1] * dy
        return np.maximum(fwhm, 0.3), np.clip(e1, -0.5, 0.5), np.clip(e2, -0.5, 0.5)

    @property
    def beta(self) -> float:
        return math.inf if self.inv_beta <= 0 else 1.0 / self.inv_beta

    def support_px(self, x: float | None = None, y: float | None = None) -> int:
        """Half-size of the stamp holding the model's light, pixels."""
        fwhm, _, _ = self.params_at(self.x_ref if x is None else x, self.y_ref if y is None else y)
        return int(np.ceil(self.support_fwhm * float(np.max(fwhm))))

    def evaluate(
        self,
        px: np.ndarray,
        py: np.ndarray,
        x0: np.ndarray | float,
        y0: np.ndarray | float,
        *,
        derivatives: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PSF of sources at ``(x0, y0)`` in pixels ``(px, py)`` (image pixels).

        The arrays broadcast against each other; the parameters are taken at each
        source's position. With ``derivatives`` also returns d psf / d x0 and
        d psf / d y0.
        """
        x0, y0 = np.asarray(x0, dtype=np.float64), np.asarray(y0, dtype=np.float64)
        fwhm, e1, e2 = self.params_at(x0, y0)
        return _profile(
            np.asarray(px, dtype=np.float64) - x0,
            np.asarray(py, dtype=np.float64) - y0,
            fwhm,
            self.inv_beta,
            e1,
            e2,
            self.oversample,
            self.support_fwhm,
            derivatives,
        )

    def stamp(self, x0: float, y0: float, half: int | None = None) -> np.ndarray:
        """The PSF of a source at ``(x0, y0)`` on the (2 half + 1)^2 pixels centred
        on its nearest pixel."""
        h = self.support_px(x0, y0) if half is None else half
        ix, iy = round(x0), round(y0)
        offs = np.arange(-h, h + 1)
        out = self.evaluate((ix + offs)[None, :], (iy + offs)[:, None], x0, y0)
        return np.asarray(out)


def _norm(fwhm: np.ndarray, u: float) -> np.ndarray:
    """Integral of the unnormalised profile over the plane."""
    h2 = (0.5 * fwhm) ** 2
    if u < 1e-6:
        return np.pi * h2 / _LN2
    return np.pi * h2 * u / (math.expm1(u * _LN2) * (1.0 - u))


def _profile(
    dx: np.ndarray,
    dy: np.ndarray,
    fwhm: np.ndarray,
    u: float,
    e1: np.ndarray,
    e2: np.ndarray,
    oversample: int,
    support_fwhm: float,
    derivatives: bool,
):
    u = float(np.clip(u, 0.0, _U_MAX))
    c = _LN2 if u < 1e-6 else math.expm1(u * _LN2)
    det = np.sqrt(1.0 - e1 * e1 - e2 * e2)
    a, b, cc = (1.0 - e1) / det, -e2 / det, (1.0 + e1) / det
    h2 = (0.5 * fwhm) ** 2
    norm = _norm(fwhm, u)
    cut = (support_fwhm * fwhm) ** 2
    if oversample > 1:
        sub = (np.arange(oversample) + 0.5) / oversample - 0.5
        shifts = [(sx, sy) for sy in sub for sx in sub]
    else:
        shifts = [(0.0, 0.0)]
    value: np.ndarray | float = 0.0
    ddx: np.ndarray | float = 0.0
    ddy: np.ndarray | float = 0.0
    for sx, sy in shifts:
        x, y = dx + sx, dy + sy
        q = a * x * x + 2.0 * b * x * y + cc * y * y
        t = q / h2
        base = 1.0 + t * c
        p = np.exp(-np.log(base) / u) if u >= 1e-6 else np.exp(-t * _LN2)
        p = np.where(x * x + y * y <= cut, p, 0.0)
        value = value + p
        if derivatives:
            # dp/dq, then dq/dx0 = -dq/dx.
            dpdq = -p * c / (h2 * base * u) if u >= 1e-6 else -p * c / h2
            ddx = ddx - dpdq * 2.0 * (a * x + b * y)
            ddy = ddy - dpdq * 2.0 * (b * x + cc * y)
    n = len(shifts) * norm
    if not derivatives:
        return value / n
    return value / n, ddx / n, ddy / n


# --- fitting ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stamps:
    data: np.ndarray  # (n, m, m)
    weight: np.ndarray  # (n, m, m) 1/sigma, 0 where masked
    px: np.ndarray  # (n, 1, m) image x of the stamp columns
    py: np.ndarray  # (n, m, 1)


def _cut(image, variance, bad, x, y, half) -> tuple[_Stamps, np.ndarray]:
    ny, nx = image.shape
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    ix, iy = ix[inside], iy[inside]
    offs = np.arange(-half, half + 1)
    rows = iy[:, None, None] + offs[None, :, None]
    cols = ix[:, None, None] + offs[None, None, :]
    data = image[rows, cols].astype(np.float64)
    var = variance[rows, cols].astype(np.float64)
    ok = ~bad[rows, cols] & np.isfinite(data) & (var > 0)
    weight = np.where(ok, 1.0 / np.sqrt(np.where(ok, var, 1.0)), 0.0)
    return _Stamps(
        data, weight, cols[:, :1, :].astype(np.float64), rows[:, :, :1].astype(np.float64)
    ), inside


def _unpack(theta: np.ndarray, n: int, spatial: bool):
    fwhm, u, e1, e2 = theta[:4]
    grad = np.zeros((3, 2))
    k = 4
    if spatial:
        grad = theta[4:10].reshape(3, 2)
        k = 10
    return fwhm, u, e1, e2, grad, theta[k : k + n], theta[k + n : k + 2 * n]


def _residuals(
    theta: np.ndarray, st: _Stamps, x_ref: float, y_ref: float, spatial: bool, oversample: int
) -> np.ndarray:
    n = st.data.shape[0]
    fwhm, u, e1, e2, grad, x0, y0 = _unpack(theta, n, spatial)
    model = PSFModel(fwhm, u, e1, e2, grad, x_ref, y_ref, oversample=oversample, support_fwhm=50.0)
    psf = np.asarray(model.evaluate(st.px, st.py, x0[:, None, None], y0[:, None, None]))
    # Flux and sky of each star by weighted linear least squares (2x2 per star).
    w2 = st.weight**2
    s_pp = (w2 * psf * psf).sum((1, 2))
    s_p1 = (w2 * psf).sum((1, 2))
    s_11 = w2.sum((1, 2))
    s_pd = (w2 * psf * st.data).sum((1, 2))
    s_1d = (w2 * st.data).sum((1, 2))
    det = s_pp * s_11 - s_p1 * s_p1
    det = np.where(np.abs(det) > 0, det, 1.0)
    flux = (s_11 * s_pd - s_p1 * s_1d) / det
    sky = (s_pp * s_1d - s_p1 * s_pd) / det
    res = (st.data - flux[:, None, None] * psf - sky[:, None, None]) * st.weight
    return res.ravel()


def fit_psf(
    image: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    fwhm_guess_px: float = 2.5,
    stamp_half_fwhm: float = 3.0,
    min_stars: int = 3,
    spatial_min_stars: int = 12,
    oversample: int = 1,
    support_fwhm: float = 4.0,
    clip_sigma: float = 4.0,
) -> PSFModel:
    """Measure a :class:`PSFModel` from stars of an image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), e-
        Fluence image (sky may be included: a sky per star is fitted).
    variance : ndarray, shape (ny, nx), e-^2
    x, y : ndarray, shape (n,), pixels
        Positions of isolated, unsaturated stars (refined in the fit).
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels to ignore.
    fwhm_guess_px : float
        Starting FWHM; also sets the stamp size.
    stamp_half_fwhm : float
        Stamps are ``2 ceil(stamp_half_fwhm * fwhm_guess_px) + 1`` pixels a side.
    min_stars : int
        Fewer stars with full, finite stamps raise :class:`PSFFitError`.
    spatial_min_stars : int
        With at least this many stars the linear variation over the image is fitted.
    oversample : int
        Pixel sampling of the model (1: at pixel centres).
    support_fwhm : float
        Support radius of the returned model, in FWHM.
    clip_sigma : float
        Stars whose stamp chi^2 is this many sigma above the median's are
        rejected once (then the fit is repeated).

    Returns
    -------
    PSFModel

    Raises
    ------
    ValueError
        Bad shapes or options.
    PSFFitError
        Too few stars, or no convergence.
    """
    image = np.asarray(image, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValueError(
            f"image and variance must be 2-D of one shape, got {image.shape}, {variance.shape}"
        )
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape}, {y.shape}")
    if not fwhm_guess_px > 0 or oversample < 1 or min_stars < 1:
        raise ValueError("fwhm_guess_px must be > 0, oversample >= 1, min_stars >= 1")
    bad = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, bool)
    if bad.shape != image.shape:
        raise ValueError(f"mask has shape {bad.shape}, expected {image.shape}")
    half = int(np.ceil(stamp_half_fwhm * fwhm_guess_px))
    st, inside = _cut(image, variance, bad, x, y, half)
    x, y = x[inside], y[inside]
    usable = (st.weight > 0).mean((1, 2)) > 0.8
    st = _Stamps(st.data[usable], st.weight[usable], st.px[usable], st.py[usable])
    x, y = x[usable], y[usable]
    if len(x) < min_stars:
        raise PSFFitError(f"only {len(x)} stars with full stamps for the PSF (need {min_stars})")
    ny, nx = image.shape
    return _fit_stamps(
        st,
        x,
        y,
        x_ref=(nx - 1) / 2.0,
        y_ref=(ny - 1) / 2.0,
        fwhm_guess_px=fwhm_guess_px,
        spatial_min_stars=spatial_min_stars,
        min_stars=min_stars,
        oversample=oversample,
        support_fwhm=support_fwhm,
        clip_sigma=clip_sigma,
    )


def fit_psf_stamps(
    data: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    fwhm_guess_px: float = 2.5,
    min_stars: int = 3,
    oversample: int = 1,
    support_fwhm: float = 4.0,
    clip_sigma: float = 4.0,
) -> PSFModel:
    """Measure a constant :class:`PSFModel` from star stamps of several images
    (quadrants of one exposure, whose PSF is one when each has too few stars).

    Parameters
    ----------
    data, variance : ndarray, shape (n, m, m), e-, e-^2
    good : ndarray of bool, shape (n, m, m)
    x, y : ndarray, shape (n,)
        Star positions in their stamp's pixels (pixel ``[0, 0]`` at (0, 0)).

    Returns
    -------
    PSFModel
        Without spatial variation (its reference point is irrelevant).
    """
    data = np.asarray(data, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    good = np.asarray(good, bool) & np.isfinite(data) & (variance > 0)
    if data.ndim != 3 or data.shape != variance.shape or data.shape != good.shape:
        raise ValueError(
            f"data, variance and good must be (n, m, m) of one shape, got {data.shape}, "
            f"{variance.shape}, {good.shape}"
        )
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != (data.shape[0],) or y.shape != x.shape:
        raise ValueError(f"x and y must have shape ({data.shape[0]},), got {x.shape}, {y.shape}")
    n, m = data.shape[0], data.shape[1]
    weight = np.where(good, 1.0 / np.sqrt(np.where(good, variance, 1.0)), 0.0)
    offs = np.arange(m, dtype=np.float64)
    st = _Stamps(
        np.where(good, data, 0.0),
        weight,
        np.broadcast_to(offs[None, None, :], (n, 1, m)).copy(),
        np.broadcast_to(offs[None, :, None], (n, m, 1)).copy(),
    )
    usable = (weight > 0).mean((1, 2)) > 0.8
    st = _Stamps(st.data[usable], st.weight[usable], st.px[usable], st.py[usable])
    if usable.sum() < min_stars:
        raise PSFFitError(
            f"only {int(usable.sum())} usable star stamps for the PSF (need {min_stars})"
        )
    return _fit_stamps(
        st,
        x[usable],
        y[usable],
        x_ref=0.0,
        y_ref=0.0,
        fwhm_guess_px=fwhm_guess_px,
        spatial_min_stars=10**9,
        min_stars=min_stars,
        oversample=oversample,
        support_fwhm=support_fwhm,
        clip_sigma=clip_sigma,
    )


def _fit_stamps(
    st: _Stamps,
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_ref: float,
    y_ref: float,
    fwhm_guess_px: float,
    spatial_min_stars: int,
    min_stars: int,
    oversample: int,
    support_fwhm: float,
    clip_sigma: float,
) -> PSFModel:
    """The fit, with one pass rejecting stars whose stamp chi^2 is an outlier."""
    keep = np.ones(len(x), bool)
    for attempt in range(2):
        spatial = int(keep.sum()) >= spatial_min_stars
        sub = _Stamps(st.data[keep], st.weight[keep], st.px[keep], st.py[keep])
        theta, chi2 = _fit(sub, x[keep], y[keep], x_ref, y_ref, fwhm_guess_px, spatial, oversample)
        per_star = chi2.reshape(int(keep.sum()), -1).sum(1) / np.maximum(
            (sub.weight > 0).sum((1, 2)), 1
        )
        med = float(np.median(per_star))
        spread = 1.4826 * float(np.median(np.abs(per_star - med)))
        ok = per_star <= med + clip_sigma * max(spread, 0.1 * med)
        if attempt == 1 or ok.all() or ok.sum() < min_stars:
            break
        keep[np.flatnonzero(keep)[~ok]] = False
    n_kept = int(keep.sum())
    fwhm, u, e1, e2, grad, _, _ = _unpack(theta, n_kept, spatial)
    n_pix = int((st.weight[keep] > 0).sum())
    n_par = len(theta) + 2 * n_kept
    return PSFModel(
        fwhm_px=float(fwhm),
        inv_beta=float(u),
        e1=float(e1),
        e2=float(e2),
        gradient=grad,
        x_ref=x_ref,
        y_ref=y_ref,
        oversample=oversample,
        support_fwhm=support_fwhm,
        n_stars=n_kept,
        chi2_dof=float(chi2.sum() / max(n_pix - n_par, 1)),
    )


def _fit(st, x, y, x_ref, y_ref, fwhm_guess, spatial, oversample):
    n = len(x)
    start = [fwhm_guess, 0.3, 0.0, 0.0] + ([0.0] * 6 if spatial else []) + list(x) + list(y)
    lo = [0.3, 0.0, -0.4, -0.4] + ([-0.05, -0.05, -0.01, -0.01, -0.01, -0.01] if spatial else [])
    hi = [20.0, _U_MAX, 0.4, 0.4] + ([0.05, 0.05, 0.01, 0.01, 0.01, 0.01] if spatial else [])
    lo += list(x - 1.5) + list(y - 1.5)
    hi += list(x + 1.5) + list(y + 1.5)
    # Star k's residuals depend on the shape and its own position only: finite
    # differences perturb every star's x (then y) at once.
    n_glob = len(start) - 2 * n
    m = int(np.prod(st.data.shape[1:]))
    sparsity = np.zeros((n * m, len(start)), dtype=bool)
    sparsity[:, :n_glob] = True
    for k in range(n):
        sparsity[k * m : (k + 1) * m, [n_glob + k, n_glob + n + k]] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        res = least_squares(
            _residuals,
            np.array(start, dtype=np.float64),
            bounds=(np.array(lo), np.array(hi)),
            args=(st, x_ref, y_ref, spatial, oversample),
            jac_sparsity=sparsity,
            x_scale="jac",
            xtol=1e-8,
            ftol=1e-10,
            max_nfev=200,
        )
    if not res.success and res.status == 0:
        raise PSFFitError(f"PSF fit did not converge in {res.nfev} evaluations ({n} stars)")
    return res.x, res.fun**2
