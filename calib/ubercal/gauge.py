"""Gauge and anchor: the exact degeneracies of the model (pins during the solve,
shifts to the stated gauge afterwards) and the reference catalog that fixes the
global level (as a prior on the star magnitudes, or an offset)."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from calib.ubercal.errors import UbercalError
from calib.ubercal.layout import UbercalLayout
from calib.ubercal.normal import NormalEquations


def anchor_stars(layout: UbercalLayout, star_n: np.ndarray, star_w: np.ndarray) -> np.ndarray:
    """Stars that tie the solution to the reference catalog: observed, with a
    reference magnitude, a colour in ``anchor_bp_rp_range`` and observations
    precise to ``anchor_max_obs_err_mag`` (from the data's ``star_n`` and
    ``sum w``, which includes the error floor), shape (n_star,) bool."""
    opt = layout.options
    lo, hi = opt.anchor_bp_rp_range
    with np.errstate(invalid="ignore", divide="ignore"):
        use = (star_n > 0) & np.isfinite(layout.ref_mag) & (layout.ref_bp_rp >= lo)
        use &= layout.ref_bp_rp <= hi
        use &= star_n <= star_w * (opt.anchor_max_obs_err_mag**2 + opt.error_floor_mag**2)
    return use


def prior_equations(
    layout: UbercalLayout, star_n: np.ndarray, anchor: np.ndarray
) -> NormalEquations:
    """The reference catalog as observations of the star magnitudes,
    ``m_s - a (bp_rp_s - pivot) = m_ref_s`` with weight
    ``1 / (ref_err^2 + anchor_scatter^2)``, for the ``anchor`` stars (see
    :func:`anchor_stars`) that still have data (``star_n > 0``); ``a`` (the
    colour term between the natural and the reference systems) is the last
    parameter."""
    opt = layout.options
    use = anchor & (star_n > 0)
    w = np.where(
        use, 1.0 / (np.nan_to_num(layout.ref_mag_err) ** 2 + opt.anchor_scatter_mag**2), 0.0
    )
    col = np.where(use, layout.ref_bp_rp - opt.colour_pivot, 0.0)
    m_ref = np.where(use, layout.ref_mag, 0.0)
    a = layout.n_param - 1
    stars = np.flatnonzero(use)
    npp, ns = layout.n_param, layout.n_star
    return NormalEquations(
        star_w=w,
        star_b=w * m_ref,
        app=sp.csr_matrix(([np.sum(w * col * col)], ([a], [a])), shape=(npp, npp)),
        aps=sp.csc_matrix((-(w * col)[stars], (np.full(len(stars), a), stars)), shape=(npp, ns)),
        bp=np.bincount([a], weights=[-np.sum(w * col * m_ref)], minlength=npp),
        star_n=np.zeros(ns, dtype=np.int64),
    )


def _gauge_pins(layout: UbercalLayout, active: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """Parameters held at zero during the factorisation, one per gauge mode."""
    pinned = np.zeros(layout.n_param, dtype=bool)
    score = np.where(active, diag, -np.inf)
    nz, nc = layout.n_zp, layout.n_cell
    if not layout.n_anchor:
        pinned[int(np.argmax(score[:nz]))] = True
    # A prior on the cells fixes their trade against the zero points (its minimum
    # along it is the zero mean of the cells): nothing to pin.
    if layout.options.starflat and layout.options.starflat_prior_mag is None:
        cells = score[nz : nz + nc].reshape(layout.n_q, layout.n_cell_per_q)
        if layout.options.zp_mode == "exposure_quadrant":
            for iq in range(layout.n_q):
                if np.isfinite(cells[iq]).any():
                    pinned[nz + iq * layout.n_cell_per_q + int(np.argmax(cells[iq]))] = True
        else:
            pinned[nz + int(np.argmax(cells.ravel()))] = True
    if layout.options.colour_term:
        pinned[nz + nc + int(np.argmax(score[layout.colour_slice]))] = True
    return pinned & active


def _gauge_transform(
    v: np.ndarray,
    layout: UbercalLayout,
    active: np.ndarray,
    *,
    centre_zp: bool,
    copy: bool = True,
) -> np.ndarray:
    """Apply the gauge shifts to parameter vectors ``v`` (n_param, ...): cells to
    zero mean (per quadrant or per focal plane), the mean moved into the zero
    points; colour terms to zero mean; optionally the mean zero point removed
    (for relative errors). Linear; inactive entries are left as they are.
    ``copy=False`` transforms ``v`` (C-contiguous) in place."""
    if copy:
        v = v.copy()
    nz, nc, nq, npq = layout.n_zp, layout.n_cell, layout.n_q, layout.n_cell_per_q
    opt = layout.options
    tail = v.shape[1:]
    if opt.starflat:
        cells = v[nz : nz + nc].reshape(nq, npq, *tail)
        act = active[nz : nz + nc].reshape(nq, npq)
        actb = act.reshape(nq, npq, *([1] * len(tail)))
        if opt.zp_mode == "exposure_quadrant":
            n = np.maximum(act.sum(axis=1), 1).reshape(nq, *([1] * len(tail)))
            mu = np.where(actb, cells, 0.0).sum(axis=1) / n  # (nq, ...)
            cells -= np.where(actb, mu[:, None], 0.0)
            zp = v[:nz].reshape(-1, nq, *tail)
            zp += mu[None]
        else:
            mu = np.where(actb, cells, 0.0).sum(axis=(0, 1)) / max(act.sum(), 1)
            cells -= np.where(actb, mu, 0.0)
            v[:nz] += mu
    if opt.colour_term:
        col = v[layout.colour_slice]
        act = active[layout.colour_slice].reshape(-1, *([1] * len(tail)))
        col -= np.where(act, np.where(act, col, 0.0).sum(axis=0) / max(act.sum(), 1), 0.0)
    if centre_zp:
        act = active[:nz].reshape(-1, *([1] * len(tail)))
        v[:nz] -= np.where(act, v[:nz], 0.0).sum(axis=0) / max(act.sum(), 1)
    return v


def _anchor(
    layout: UbercalLayout, star_mag: np.ndarray, star_n: np.ndarray, star_w: np.ndarray
) -> tuple[float, float, int]:
    """Offset ``a`` such that ``m_s + a`` matches the reference catalog."""
    opt = layout.options
    if not layout.has_reference:
        return 0.0, 0.0, 0
    lo, hi = opt.anchor_bp_rp_range
    use = anchor_stars(layout, star_n, star_w) & np.isfinite(star_mag)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(
            use, np.nan_to_num(layout.ref_mag_err) ** 2 + 1.0 / np.where(use, star_w, 1.0), np.inf
        )
    diff = layout.ref_mag - star_mag
    if np.count_nonzero(use) < 3:
        raise UbercalError(
            "reference: fewer than 3 observed reference stars with colours in "
            f"anchor_bp_rp_range={lo, hi} and observation errors <= "
            f"anchor_max_obs_err_mag={opt.anchor_max_obs_err_mag}; the zero points cannot "
            "be anchored"
        )
    for _ in range(10):
        w = np.where(use, 1.0 / var, 0.0)
        mean = float(np.sum(w * np.where(use, diff, 0.0)) / w.sum())
        d = diff[use] - mean
        scale = 1.4826 * np.median(np.abs(d))
        new = use & (np.abs(diff - mean) <= opt.anchor_clip_sigma * max(scale, 1e-6))
        if np.array_equal(new, use):
            break
        use = new
    n = int(use.sum())
    # The scatter of m_ref - m_s holds the reference system's colour term, so the
    # error comes from it, not from the formal weights.
    err = float(np.std(diff[use]) / math.sqrt(n))
    return mean, err, n
