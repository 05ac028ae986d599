"""Sizing the model to the data: zero-point granularity and starflat resolution
when the user leaves them to ``'auto'`` (docs/ubercal.md, "Sizing").

The rule, from one pass over the observations:

* zero points per exposure-quadrant when the median exposure-quadrant has at
  least ``auto_min_obs_per_zp`` usable observations, else per exposure (a
  quadrant with a handful of stars cannot carry its own zero point, and its
  exposure-quadrants fall apart into disconnected groups);
* starflat cells per axis ``n``: at most ``auto_max_cells``; ``n^2`` at most the
  median usable observations per quadrant over ``auto_obs_per_cell`` (each cell
  measured by enough observations); ``n`` at most ``auto_cells_per_dither`` times
  the median rms position of a star over its visits in quadrant widths (a star
  that hardly moves links no neighbouring cells); at least 1;
* an exposure gradient when the median exposure measures it to
  ``auto_max_gradient_err_mag`` or better: its error along an axis is
  ``1 / sqrt(sum w (f - f_zp)^2)`` over the exposure's usable observations, ``f``
  the position in quadrant widths, ``f_zp`` the weighted mean position of the
  observations sharing its zero point, ``w = 1 / (err^2 + floor^2)``; the larger
  of the two axes counts. (The stars' own magnitudes, also fitted, take some of
  that information: the estimate is a lower bound of the fitted error.) A
  gradient known worse than that adds its error to every zero point whose
  stars sit off the quadrant's centre.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from calib.ubercal.observations import ObservationChunk, ObservationSource, _Ids, _lookup
from calib.ubercal.options import UbercalOptions

__all__ = ["ModelSizing", "size_model"]


@dataclass(frozen=True)
class ModelSizing:
    """How the model was sized.

    Attributes
    ----------
    zp_mode : str
    cells : (int, int)
    zp_mode_rule, cells_rule : str
        ``'auto'`` (sized by the rule) or ``'given'``.
    gradient : bool
    gradient_rule : str
        ``'auto'`` or ``'given'``.
    median_gradient_err : float, mag
        Median over exposures of the gradient's error (the larger axis), NaN when
        not measured.
    median_obs_per_zp : float
        Median usable observations per exposure-quadrant (NaN when not measured).
    median_obs_per_quadrant : float
        Median usable observations per quadrant.
    dither_rms : float, quadrant widths
        Median over stars seen twice or more of the rms of their position on the
        quadrant, ``sqrt((var x + var y) / 2)``.
    """

    zp_mode: str
    cells: tuple[int, int]
    zp_mode_rule: str
    cells_rule: str
    gradient: bool = True
    gradient_rule: str = "given"
    median_gradient_err: float = math.nan
    median_obs_per_zp: float = math.nan
    median_obs_per_quadrant: float = math.nan
    dither_rms: float = math.nan

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["cells"] = list(self.cells)
        return out

    def describe(self) -> str:
        """One line for the run summary."""
        return (
            f"zero points per {self.zp_mode.replace('_', '-')} ({self.zp_mode_rule}), "
            f"{self.cells[0]}x{self.cells[1]} starflat cells ({self.cells_rule}), "
            f"exposure gradients {'on' if self.gradient else 'off'} ({self.gradient_rule}); "
            f"median {self.median_obs_per_zp:.0f} observations per exposure-quadrant, "
            f"{self.median_obs_per_quadrant:.0f} per quadrant, dither rms "
            f"{self.dither_rms:.3f} quadrant widths, gradient error "
            f"{1e3 * self.median_gradient_err:.1f} mmag"
        )


@dataclass(frozen=True)
class _SizingSums:
    zp_n: np.ndarray  # (n_exp, n_q) usable observations
    star: np.ndarray  # (5, n_star): n, sum fx, sum fx^2, sum fy, sum fy^2
    zp_w: np.ndarray  # (5, n_exp, n_q): sum w, w fx, w fx^2, w fy, w fy^2

    def __add__(self, other: _SizingSums) -> _SizingSums:
        return _SizingSums(self.zp_n + other.zp_n, self.star + other.star, self.zp_w + other.zp_w)


@dataclass(frozen=True)
class _CountUsable:
    """Picklable function of one chunk (shipped to where the chunk lives)."""

    ids: _Ids
    quad_nx: int
    quad_ny: int
    error_floor_mag: float = 0.0

    def __call__(self, chunk: ObservationChunk) -> _SizingSums:
        e = _lookup(self.ids.expid, chunk.expid)
        q = _lookup(self.ids.quadrant, chunk.quadrant)
        s = _lookup(self.ids.source_id, chunk.source_id)
        err = np.asarray(chunk.mag_inst_err, dtype=np.float64)
        good = (e >= 0) & (q >= 0) & (s >= 0) & np.isfinite(chunk.mag_inst)
        good &= np.isfinite(err) & (err > 0)
        if chunk.flags is not None:
            good &= np.asarray(chunk.flags) == 0
        n_e, n_q, n_s = len(self.ids.expid), len(self.ids.quadrant), len(self.ids.source_id)
        zp_n = np.bincount(e[good] * n_q + q[good], minlength=n_e * n_q).reshape(n_e, n_q)
        fx = (np.asarray(chunk.x, dtype=np.float64)[good] + 0.5) / self.quad_nx
        fy = (np.asarray(chunk.y, dtype=np.float64)[good] + 0.5) / self.quad_ny
        sg = s[good]
        star = np.stack(
            [np.bincount(sg, weights=v, minlength=n_s) for v in (None, fx, fx**2, fy, fy**2)]
        )
        w = 1.0 / (err[good] ** 2 + self.error_floor_mag**2)
        zq = e[good] * n_q + q[good]
        zp_w = np.stack(
            [
                np.bincount(zq, weights=v, minlength=n_e * n_q).reshape(n_e, n_q)
                for v in (w, w * fx, w * fx**2, w * fy, w * fy**2)
            ]
        )
        return _SizingSums(zp_n, star, zp_w)


def _gradient_errors(zp_w: np.ndarray, zp_mode: str) -> np.ndarray:
    """Per exposure, the gradient's error along its worse axis [mag per quadrant
    width], positions centred on their zero point's (exposure or
    exposure-quadrant) weighted mean; inf where an exposure cannot measure it."""
    sums = zp_w if zp_mode == "exposure_quadrant" else zp_w.sum(axis=2, keepdims=True)
    w, wx, wxx, wy, wyy = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        info_x = np.where(w > 0, wxx - wx**2 / w, 0.0).sum(axis=1)
        info_y = np.where(w > 0, wyy - wy**2 / w, 0.0).sum(axis=1)
        info = np.minimum(info_x, info_y)
        return np.where(info > 0, 1.0 / np.sqrt(np.maximum(info, 1e-300)), np.inf)


def size_model(
    source: ObservationSource, ids: _Ids, *, quad_nx: int, quad_ny: int, options: UbercalOptions
) -> tuple[UbercalOptions, ModelSizing]:
    """Resolve ``zp_mode='auto'`` and ``cells='auto'`` by the rule of this module
    (one pass over ``source`` when either is ``'auto'``).

    Returns
    -------
    (UbercalOptions, ModelSizing)
        The options with both settled, and the record of the decision.
    """
    auto_zp, auto_cells = options.zp_mode == "auto", options.cells == "auto"
    auto_gradient = options.exposure_gradient == "auto"
    if not (auto_zp or auto_cells or auto_gradient):
        given = bool(options.exposure_gradient)
        return options, ModelSizing(options.zp_mode, options.grid, "given", "given", given)
    sums = source.map_reduce(_CountUsable(ids, quad_nx, quad_ny, options.error_floor_mag))
    seen = sums.zp_n[sums.zp_n > 0]
    per_zp = float(np.median(seen)) if len(seen) else 0.0
    per_q = sums.zp_n.sum(axis=0)
    per_quadrant = float(np.median(per_q[per_q > 0])) if (per_q > 0).any() else 0.0
    n, sx, sxx, sy, syy = sums.star
    many = n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (sxx - sx**2 / n + syy - sy**2 / n) / (2 * np.maximum(n - 1, 1))
    dither = float(np.median(np.sqrt(np.maximum(var[many], 0.0)))) if many.any() else 0.0
    zp_mode = options.zp_mode
    if auto_zp:
        zp_mode = "exposure_quadrant" if per_zp >= options.auto_min_obs_per_zp else "exposure"
    if auto_cells:
        by_obs = math.sqrt(per_quadrant / options.auto_obs_per_cell)
        by_dither = options.auto_cells_per_dither * dither
        k = int(max(1, min(options.auto_max_cells, math.floor(by_obs), math.floor(by_dither))))
        cells = (k, k)
    else:
        cells = options.grid
    errors = _gradient_errors(sums.zp_w, zp_mode)
    measured = errors[np.isfinite(errors)]
    gradient_err = float(np.median(measured)) if len(measured) else math.inf
    gradient = bool(options.exposure_gradient)
    if auto_gradient:
        gradient = gradient_err <= options.auto_max_gradient_err_mag
    sizing = ModelSizing(
        zp_mode=zp_mode,
        cells=cells,
        zp_mode_rule="auto" if auto_zp else "given",
        cells_rule="auto" if auto_cells else "given",
        gradient=gradient,
        gradient_rule="auto" if auto_gradient else "given",
        median_gradient_err=gradient_err,
        median_obs_per_zp=per_zp,
        median_obs_per_quadrant=per_quadrant,
        dither_rms=dither,
    )
    return options.replace(zp_mode=zp_mode, cells=cells, exposure_gradient=gradient), sizing
