"""The flux scale of scene-modelling photometry, measured on calibration stars
(seed 004's "smphot flux bias"; docs/lightcurves.md).

The calibrated magnitude of a star, ``m = m_inst + zp + dzp``, refers to the
photometry stage's aperture-corrected flux, while the scene model measures a
PSF flux; the two differ by the PSF model's normalisation (its wings, its
sampling) and by whatever the zero points miss locally. Fitting the stars
around the transient with the same estimator and comparing their fluxes with
their catalog (ubercal) fluxes measures that ratio; dividing the transient's
fluxes by it puts them on the catalog's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["AB_NJY_ZERO_POINT", "FluxScale", "measure_flux_scale"]

AB_NJY_ZERO_POINT = 31.4
"""``flux_njy = 10**(-0.4 (m - 31.4))``: the AB magnitude of 1 nJy."""


@dataclass(frozen=True)
class FluxScale:
    """Ratio of measured to catalog fluxes of calibration stars.

    Attributes
    ----------
    ratio, ratio_err : float
        Weighted mean over stars of (mean measured flux) / (catalog flux), and its
        error; 1 and 0 when no star was usable.
    chi2_dof : float
        Of the stars' ratios about it, with their errors (measurement and
        catalog): about 1 when the errors are right and the scale is one number.
    n_stars : int
        Stars kept (after clipping).
    n_rejected : int
        Stars clipped (variables, blends).
    per_epoch, per_epoch_err : ndarray, shape (n_epochs,)
        The same ratio in each epoch, from that epoch's stars; NaN without any.
    per_epoch_n : ndarray of int, shape (n_epochs,)
        Stars behind each epoch's ratio.
    per_epoch_chi2_dof : float
        Of the per-epoch ratios about ``ratio``: above 1 when the scale changes
        from image to image (PSF-model or zero-point errors per image).
    """

    ratio: float
    ratio_err: float
    chi2_dof: float
    n_stars: int
    n_rejected: int
    per_epoch: np.ndarray
    per_epoch_err: np.ndarray
    per_epoch_chi2_dof: float
    per_epoch_n: np.ndarray

    def as_dict(self) -> dict:
        return {
            "ratio": self.ratio,
            "ratio_err": self.ratio_err,
            "chi2_dof": self.chi2_dof,
            "n_stars": self.n_stars,
            "n_rejected": self.n_rejected,
            "per_epoch_chi2_dof": self.per_epoch_chi2_dof,
        }

    def correction(
        self,
        mode: Literal["auto", "global", "per_epoch", "none"] = "auto",
        *,
        per_epoch_max_err: float = 0.005,
        per_epoch_min_stars: int = 3,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What each epoch's fluxes (or scales) are divided by.

        Parameters
        ----------
        mode : {'auto', 'global', 'per_epoch', 'none'}
            ``auto``: an epoch's own ratio where at least ``per_epoch_min_stars``
            stars fix it to ``per_epoch_max_err``, the overall ratio elsewhere;
            ``per_epoch``: its own ratio wherever it has one; ``global``: the
            overall ratio; ``none``: 1.
        per_epoch_max_err : float
        per_epoch_min_stars : int

        Returns
        -------
        ratio, ratio_err : ndarray, shape (n_epochs,)
        own : ndarray of bool, shape (n_epochs,)
            Whether the epoch's own ratio is used (its error then stands for the
            epoch's calibration error).
        """
        n = len(self.per_epoch)
        if mode == "none":
            return np.ones(n), np.zeros(n), np.zeros(n, dtype=bool)
        own = np.isfinite(self.per_epoch) & (self.per_epoch_n >= 1)
        if mode == "auto":
            own &= (self.per_epoch_n >= per_epoch_min_stars) & (
                self.per_epoch_err <= per_epoch_max_err
            )
        elif mode == "global":
            own[:] = False
        elif mode != "per_epoch":
            raise ValueError(f"mode must be auto, global, per_epoch or none; got {mode!r}")
        ratio = np.where(own, self.per_epoch, self.ratio)
        return ratio, np.where(own, self.per_epoch_err, self.ratio_err), own


def _wmean(x: np.ndarray, err: np.ndarray, axis: int | None = None):
    w = np.where(np.isfinite(x) & np.isfinite(err) & (err > 0), 1.0 / np.square(err), 0.0)
    sw = w.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, np.nansum(np.where(w > 0, x, 0.0) * w, axis=axis) / sw, np.nan)
        return mean, np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)


def measure_flux_scale(
    flux: np.ndarray,
    flux_err: np.ndarray,
    catalog_flux: np.ndarray,
    catalog_err: np.ndarray,
    *,
    clip_sigma: float = 4.0,
    min_stars: int = 3,
) -> FluxScale:
    """Flux scale from calibration stars measured in several epochs.

    Parameters
    ----------
    flux, flux_err : ndarray, shape (n_stars, n_epochs), nJy
        Measured fluxes (NaN where a star has no measurement in an epoch).
    catalog_flux, catalog_err : ndarray, shape (n_stars,), nJy
        Their catalog fluxes.
    clip_sigma : float
        Stars whose ratio is this many sigma from the weighted median are left
        out (iterated).
    min_stars : int
        With fewer usable stars the ratio is 1 (no correction) and its error 0.

    Returns
    -------
    FluxScale
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    flux_err = np.atleast_2d(np.asarray(flux_err, dtype=np.float64))
    cat = np.asarray(catalog_flux, dtype=np.float64)
    cat_err = np.asarray(catalog_err, dtype=np.float64)
    if flux.shape != flux_err.shape or flux.shape[0] != len(cat) or cat.shape != cat_err.shape:
        raise ValueError(
            f"flux/flux_err must be (n_stars, n_epochs) with n_stars = len(catalog_flux); got "
            f"{flux.shape}, {flux_err.shape}, {cat.shape}, {cat_err.shape}"
        )
    n_epochs = flux.shape[1]
    mean, mean_err = _wmean(flux, flux_err, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = mean / cat
        r_err = np.abs(r) * np.hypot(mean_err / mean, cat_err / cat)
    ok = np.isfinite(r) & np.isfinite(r_err) & (r_err > 0) & (cat > 0)
    keep = ok.copy()
    for _ in range(10):
        if keep.sum() < min_stars:
            break
        med = _weighted_median(r[keep], 1.0 / r_err[keep] ** 2)
        new = ok & (
            np.abs(r - med) <= clip_sigma * np.sqrt(r_err**2 + _scatter(r, r_err, keep) ** 2)
        )
        if np.array_equal(new, keep):
            break
        keep = new
    nan_epochs = np.full(n_epochs, np.nan)
    if keep.sum() < min_stars:
        return FluxScale(
            1.0,
            0.0,
            float("nan"),
            int(keep.sum()),
            int(ok.sum() - keep.sum()),
            nan_epochs,
            nan_epochs.copy(),
            float("nan"),
            np.zeros(n_epochs, dtype=np.int64),
        )
    ratio, ratio_err = (float(v) for v in _wmean(r[keep], r_err[keep]))
    chi2 = float(np.sum(((r[keep] - ratio) / r_err[keep]) ** 2)) / max(int(keep.sum()) - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = flux[keep] / cat[keep, None]
        per_err = np.abs(per) * np.hypot(flux_err[keep] / flux[keep], (cat_err / cat)[keep, None])
    pe, pe_err = _wmean(per, per_err, axis=0)
    good = np.isfinite(pe) & (pe_err > 0)
    pe_chi2 = (
        float(np.sum(((pe[good] - ratio) / pe_err[good]) ** 2)) / max(int(good.sum()) - 1, 1)
        if good.any()
        else float("nan")
    )
    return FluxScale(
        ratio=ratio,
        ratio_err=ratio_err,
        chi2_dof=chi2,
        n_stars=int(keep.sum()),
        n_rejected=int(ok.sum() - keep.sum()),
        per_epoch=pe,
        per_epoch_err=pe_err,
        per_epoch_chi2_dof=pe_chi2,
        per_epoch_n=np.isfinite(per).sum(axis=0).astype(np.int64),
    )


def _scatter(r: np.ndarray, err: np.ndarray, keep: np.ndarray) -> float:
    """Extra scatter of the kept ratios beyond their errors (robust), for the clip."""
    med = np.median(r[keep])
    mad = 1.4826 * np.median(np.abs(r[keep] - med))
    return float(np.sqrt(max(mad**2 - np.median(err[keep]) ** 2, 0.0)))


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cw = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cw, 0.5 * cw[-1])])
