"""The lightcurves stage: scene-modelling photometry of transients on the ubercal
system, with forced photometry on difference images beside it (seed 004;
docs/lightcurves.md).

Inputs: the targets table (``--targets``: name, ra, dec, optional
``no_flux_before`` / ``no_flux_after``), the reduced products kept by
``--keep-reduced`` (``nights/<night>/reduced/<expid>``: fluence, variance,
mask, WCS), the night catalogs and exposures (star positions, fluxes, flags,
FWHM, centroid offsets), and ``ubercal/<band>`` (zero points, starflat, star
magnitudes). Per target and band:

1. every quadrant of every kept exposure near the target gives a stamp (two or
   more when the stamp crosses a quadrant boundary), its PSF measured on the
   quadrant's clean stars around the target (:func:`calib.psf.fit_psf`), its
   photometric scale ``alpha = EXPTIME 10**(0.4 (zp + dzp - 31.4))`` e-/nJy
   from ubercal, and its relative astrometry (the WCS linearised at the target,
   corrected by the photometry stage's measured centroid offset);
2. the scene model is fitted (:func:`calib.scene.fit_scene`), the baseline
   epochs from the targets table or, without it, from the light curve
   (:func:`calib.scene.choose_baseline`);
3. calibration stars around the target are fitted with the same estimator
   (no galaxy) and compared with their ubercal magnitudes; the ratio corrects
   the flux scale (:func:`calib.fluxscale.measure_flux_scale`);
4. the classical comparison: a reference from the baseline epochs, resampled
   onto each epoch, PSF-matched and subtracted, forced PSF photometry at the
   transient's position (:mod:`calib.forced`), calibrated the same way.

Writes ``lightcurves/<name>`` (scene model) and ``lightcurves_forced/<name>``
(difference images), dim ``epoch``: expid, mjd, band, flux_njy, flux_njy_err,
mag, mag_err, flags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr
from astropy.wcs import WCS
from prefect import task
from pydantic import Field

from calib.fluxscale import AB_NJY_ZERO_POINT, FluxScale, measure_flux_scale
from calib.forced import ReferencePart, build_reference, difference_flux, resample
from calib.psf import PSFFitError, PSFModel, fit_psf, fit_psf_stamps
from calib.scene import (
    AffineMap,
    SceneFit,
    SceneFitOptions,
    SceneImage,
    choose_baseline,
    fit_scene,
)
from calib.starflat import Starflat
from tasks.config import StageConfig
from tasks.io import groups
from tasks.io.provenance import provenance
from tasks.io.reduced import ReducedExposure, open_reduced, reduced_exposures
from tasks.io.store import StoreError, group_exists, read_group, write_group
from tasks.io.targets import Target, read_targets
from tasks.logs import run_logger

FLAG_BITS = {
    "off_detector": 1,
    "no_calibration": 2,
    "partial": 4,
    "masked_core": 8,
    "no_psf": 16,
    "poor_fit": 32,
    "fit_failed": 64,
}
"""Per-epoch flags (0 good): 1 the target is in a gap or off the data section;
2 no ubercal zero point; 4 the stamp is cut by the quadrant's edge (fewer pixels,
still measured); 8 a masked pixel (defect, saturation, cosmic ray) within one
FWHM of the transient; 16 no PSF model (too few stars); 32 the image's chi^2 per
pixel is above ``poor_fit_chi2``; 64 the band's fit failed (the attrs say why).
Flags 1, 2, 16 and 64 leave the flux NaN."""
_NO_FLUX = 1 | 2 | 16 | 64
_PHOT_EDGE = 4  # calib.photometry.FLAG_EDGE: the 3-FWHM aperture crosses the edge
_MAG_ERR = 2.5 / math.log(10.0)


class LightcurveConfig(StageConfig, table="lightcurves"):
    """Configuration of the lightcurves stage (table [lightcurves] of --config)."""

    bands: list[Literal["g", "r", "i"]] | None = Field(
        None, description="Bands to measure; None: every band with kept exposures."
    )
    stamp_half_fwhm: float = Field(
        2.5, gt=0.5, le=10, description="Half-size of each image's stamp, in its FWHM."
    )
    region_half_px: int = Field(
        128,
        ge=16,
        le=2048,
        description="Half-size of the region read around the target in each quadrant: "
        "PSF and calibration stars come from it (and the difference-image cutout).",
    )
    psf_min_snr: float = Field(30.0, gt=0, description="PSF stars: minimum catalog S/N.")
    psf_max_stars: int = Field(40, ge=3, description="PSF stars: at most this many (brightest).")
    psf_min_stars: int = Field(
        6,
        ge=3,
        description="With fewer PSF stars around the target in its quadrant, one PSF is "
        "fitted to the stars of every quadrant of the exposure (no spatial variation).",
    )
    psf_oversample: int = Field(
        1,
        ge=1,
        le=5,
        description="PSF sampling: 1 at pixel centres (as the simulator renders), n: "
        "integrated over n x n sub-pixels (real detectors).",
    )
    calib_min_snr: float = Field(20.0, gt=0, description="Calibration stars: minimum catalog S/N.")
    calib_max_stars: int = Field(
        25, ge=0, description="Calibration stars: at most this many (most epochs, then S/N)."
    )
    flux_scale: Literal["auto", "global", "per_epoch", "none"] = Field(
        "auto",
        description="Correct each image's scale by the calibration stars' ratio of fitted "
        "to catalog fluxes: the epoch's own ratio where its stars fix it to "
        "per_epoch_max_err (auto), always (per_epoch), one ratio per band (global), or "
        "not at all (none).",
    )
    per_epoch_max_err: float = Field(
        0.005,
        gt=0,
        description="auto: an epoch's own ratio is used when its error is at most this "
        "(and >= 3 stars fix it); otherwise the band's.",
    )
    regularisation: float = Field(
        1e-3, ge=0, description="Smoothness penalty on the galaxy grid (SceneFitOptions)."
    )
    grid_margin_fwhm: float = Field(
        2.5, ge=0, description="Galaxy nodes beyond the data, in FWHM (SceneFitOptions)."
    )
    baseline_mode: Literal["mean_zero", "fixed_zero"] = Field(
        "mean_zero",
        description="Baseline epochs: their mean flux is zero (each stays fitted) or each "
        "is held at zero.",
    )
    fit_position: bool = Field(True, description="Fit the transient's position.")
    position_min_snr: float = Field(
        20.0, gt=0, description="Summed S/N below which the position stays as given."
    )
    clip_sigma: float = Field(5.0, ge=0, description="Pixel outlier clipping (0: none).")
    include_zp_errors: bool = Field(
        True, description="Propagate the ubercal zero points' errors into the fluxes."
    )
    forced: bool = Field(True, description="Also measure forced photometry on difference images.")
    forced_cutout_px: int = Field(
        256,
        ge=48,
        le=2048,
        description="Side of the difference-image cutout (clipped to the quadrant), pixels.",
    )
    forced_kernel_snr: float = Field(
        10.0,
        gt=0,
        description="Stars whose peak is above this many sky sigma fit the PSF-matching kernel.",
    )
    poor_fit_chi2: float = Field(
        3.0, gt=0, description="Flag (32) images whose chi^2 per pixel exceeds this."
    )

    def scene_options(self) -> SceneFitOptions:
        return SceneFitOptions(
            regularisation=self.regularisation,
            grid_margin_fwhm=self.grid_margin_fwhm,
            fit_position=self.fit_position,
            position_min_snr=self.position_min_snr,
            clip_sigma=self.clip_sigma,
            baseline_mode=self.baseline_mode,
        )


# --- the plan: which quadrants of which exposures see each target --------------------


@dataclass(frozen=True)
class Piece:
    """One quadrant of one exposure near a target; (x, y) the target there."""

    quadrant: int
    x: float
    y: float
    inside: bool  # the target's centre is on this quadrant's data section


@dataclass(frozen=True)
class Epoch:
    night: str
    expid: int
    mjd: float
    band: str
    exptime_s: float
    pieces: tuple[Piece, ...]

    @property
    def on_detector(self) -> bool:
        return any(p.inside for p in self.pieces)


def _world_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def plan_targets(
    store: str,
    targets: list[Target],
    *,
    nights: list[str] | None = None,
    margin_px: float = 12.0,
) -> dict[str, list[Epoch]]:
    """Per target, the kept exposures whose quadrants hold it or come within
    ``margin_px`` of it (those then carry flag 1, in a gap or off an edge)."""
    ra = np.array([t.ra_deg for t in targets])
    dec = np.array([t.dec_deg for t in targets])
    plan: dict[str, list[Epoch]] = {t.name: [] for t in targets}
    exposures: dict[str, xr.Dataset] = {}
    for night, expid in reduced_exposures(store, nights):
        if night not in exposures:
            exposures[night] = read_group(store, groups.exposures(night))
        ex = exposures[night]
        row = np.flatnonzero(ex.expid.values == expid)
        if not len(row):
            continue
        red = open_reduced(store, night, expid)
        ny, nx = red.shape
        pieces: list[list[Piece]] = [[] for _ in targets]
        for q in red.quadrants:
            x, y = _world_to_pixel(red.wcs(int(q)), ra, dec)
            near = (x > -margin_px) & (x < nx - 1 + margin_px)
            near &= (y > -margin_px) & (y < ny - 1 + margin_px)
            inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
            for k in np.flatnonzero(near):
                pieces[k].append(Piece(int(q), float(x[k]), float(y[k]), bool(inside[k])))
        i = int(row[0])
        for k, t in enumerate(targets):
            if pieces[k]:
                plan[t.name].append(
                    Epoch(
                        night=night,
                        expid=int(expid),
                        mjd=float(ex.mjd.values[i]),
                        band=str(ex.band.values[i]),
                        exptime_s=float(ex.exptime_s.values[i]),
                        pieces=tuple(pieces[k]),
                    )
                )
    return plan


# --- the inputs of one target ------------------------------------------------------------


class _Inputs:
    """Cached reads of the groups a target needs."""

    def __init__(self, store: str) -> None:
        self.store = store
        self._ubercal: dict[str, xr.Dataset] = {}
        self._nights: dict[str, tuple[xr.Dataset, xr.Dataset]] = {}
        self._reduced: dict[int, ReducedExposure] = {}
        self._psf: dict[int, PSFModel | None] = {}

    def ubercal(self, band: str) -> xr.Dataset:
        if band not in self._ubercal:
            group = groups.ubercal(band)
            if not group_exists(self.store, group):
                raise StoreError(
                    f"{self.store}: no {group}: run the ubercal stage first (the light "
                    "curves are calibrated on its zero points)"
                )
            self._ubercal[band] = read_group(self.store, group)
        return self._ubercal[band]

    def night(self, night: str) -> tuple[xr.Dataset, xr.Dataset]:
        if night not in self._nights:
            self._nights[night] = (
                read_group(self.store, groups.catalog(night)),
                read_group(self.store, groups.exposures(night)),
            )
        return self._nights[night]

    def reduced(self, night: str, expid: int) -> ReducedExposure:
        if expid not in self._reduced:
            self._reduced[expid] = open_reduced(self.store, night, expid)
        return self._reduced[expid]

    def exposure_psf(
        self, epoch: Epoch, fwhm_px: float, config: LightcurveConfig
    ) -> PSFModel | None:
        """One PSF from the stars of every quadrant of an exposure (cached)."""
        if epoch.expid in self._psf:
            return self._psf[epoch.expid]
        red = self.reduced(epoch.night, epoch.expid)
        cat, _ = self.night(epoch.night)
        half = int(np.ceil(3.0 * fwhm_px))
        ny, nx = red.shape
        data, var, good, xs, ys = [], [], [], [], []
        for q in red.quadrants:
            sel = (cat.expid.values == epoch.expid) & (cat.quadrant.values == q)
            stars = {
                "x": cat.x.values[sel],
                "y": cat.y.values[sel],
                "snr": cat.flux.values[sel] / cat.flux_err.values[sel],
                "flags": cat.flags.values[sel],
            }
            for k in _psf_candidates(stars, config):
                ix, iy = round(stars["x"][k]), round(stars["y"][k])
                if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
                    continue
                f, v, m = red.region(int(q), ix - half, ix + half + 1, iy - half, iy + half + 1)
                data.append(f)
                var.append(v)
                good.append(m == 0)
                xs.append(stars["x"][k] - (ix - half))
                ys.append(stars["y"][k] - (iy - half))
        psf = None
        if len(xs) >= 3:
            try:
                psf = fit_psf_stamps(
                    np.stack(data),
                    np.stack(var),
                    np.stack(good),
                    np.array(xs),
                    np.array(ys),
                    fwhm_guess_px=fwhm_px,
                    oversample=config.psf_oversample,
                )
            except PSFFitError:
                psf = None
        self._psf[epoch.expid] = psf
        return psf


def _starflat(ds: xr.Dataset) -> Starflat | None:
    if "starflat" not in ds:
        return None
    return Starflat(
        quadrants=ds.quadrant.values,
        dzp_mag=ds.starflat.values,
        dzp_err_mag=ds.starflat_err.values,
        quad_nx=int(ds.attrs["quad_nx"]),
        quad_ny=int(ds.attrs["quad_ny"]),
        gauge=str(ds.attrs.get("starflat_gauge", "quadrant")),
    )


@dataclass(eq=False)
class _PieceData:
    """A piece's region, PSF, calibration and mapping."""

    epoch: int
    piece: Piece
    red: ReducedExposure
    rx0: int  # region origin in the quadrant
    ry0: int
    image: np.ndarray  # region fluence
    variance: np.ndarray
    mask: np.ndarray
    read_noise_e: float
    fwhm_px: float
    centroid: tuple[float, float]  # measured star offset from the WCS, px
    zp: float
    zp_err: float
    dzp: float
    alpha: float
    stars: dict[str, np.ndarray]  # catalog rows in the region (region coords)
    alpha_ubercal: float = float("nan")  # before the stars' correction
    zp_err_ubercal: float = float("nan")
    psf: PSFModel | None = None
    wcs: WCS | None = None
    flags: int = 0


def _gradient(ub: xr.Dataset, row: int, fx: float, fy: float) -> float:
    """The exposure's zero-point gradient term at a position, mag (ubercal's model:
    ``m = m_inst + zp + dzp + g_x (x / nx - 1/2) + g_y (y / ny - 1/2)``)."""
    if "gradient" not in ub:
        return 0.0
    g = ub.gradient.values[row]
    value = float(g[0] * fx + g[1] * fy)
    return value if np.isfinite(value) else 0.0


def _alpha(exptime_s: float, zp: float, dzp: float) -> float:
    """e- per nJy: m = m_inst + zp + dzp and flux_njy = 10**(-0.4 (m - 31.4))."""
    return exptime_s * 10 ** (0.4 * (zp + dzp - AB_NJY_ZERO_POINT))


def _photon_scale(fluence: np.ndarray, variance: np.ndarray, read_noise_e: float) -> np.ndarray:
    """``k`` with ``variance = k signal + k^2 rn^2`` (k = area / flat), solved per pixel
    (where the electrons were clipped at zero, ``variance = k^2 rn^2``)."""
    f = fluence.astype(np.float64)
    v = variance.astype(np.float64)
    rn2 = max(read_noise_e, 1e-3) ** 2
    quad = (-f + np.sqrt(f * f + 4.0 * rn2 * v)) / (2.0 * rn2)
    return np.where(f > 0, quad, np.sqrt(np.clip(v, 0.0, None) / rn2))


def _load_piece(
    inputs: _Inputs,
    epoch: Epoch,
    index: int,
    piece: Piece,
    config: LightcurveConfig,
    *,
    half: int | None = None,
) -> _PieceData:
    red = inputs.reduced(epoch.night, epoch.expid)
    cat, exps = inputs.night(epoch.night)
    ub = inputs.ubercal(epoch.band)
    ny, nx = red.shape
    h = config.region_half_px if half is None else half
    cx, cy = round(piece.x), round(piece.y)
    rx0, rx1 = max(0, cx - h), min(nx, cx + h + 1)
    ry0, ry1 = max(0, cy - h), min(ny, cy + h + 1)
    image, variance, mask = red.region(piece.quadrant, rx0, rx1, ry0, ry1)
    erow = int(np.flatnonzero(exps.expid.values == epoch.expid)[0])
    qcol = np.flatnonzero(exps.quadrant.values == piece.quadrant)
    fwhm = float(exps.fwhm_px.values[erow, qcol[0]]) if len(qcol) else float("nan")
    cdx = float(exps.centroid_dx_px.values[erow, qcol[0]]) if len(qcol) else 0.0
    cdy = float(exps.centroid_dy_px.values[erow, qcol[0]]) if len(qcol) else 0.0
    zp = zp_err = dzp = float("nan")
    e = np.flatnonzero(ub.expid.values == epoch.expid)
    q = np.flatnonzero(ub.quadrant.values == piece.quadrant)
    if len(e) and len(q):
        zp, zp_err = float(ub.zp.values[e[0], q[0]]), float(ub.zp_err.values[e[0], q[0]])
        sf = _starflat(ub)
        dzp = 0.0
        if sf is not None and piece.quadrant in sf.quadrants:
            dzp = float(
                sf.evaluate(np.array([piece.quadrant]), np.array([piece.x]), np.array([piece.y]))[0]
            )
            dzp = 0.0 if not np.isfinite(dzp) else dzp
        dzp += _gradient(ub, int(e[0]), piece.x / nx - 0.5, piece.y / ny - 0.5)
    sel = (cat.expid.values == epoch.expid) & (cat.quadrant.values == piece.quadrant)
    sel &= (
        (cat.x.values >= rx0) & (cat.x.values < rx1) & (cat.y.values >= ry0) & (cat.y.values < ry1)
    )
    stars = {
        "source_id": cat.source_id.values[sel],
        "x": cat.x.values[sel] - rx0,
        "y": cat.y.values[sel] - ry0,
        "snr": cat.flux.values[sel] / cat.flux_err.values[sel],
        "flags": cat.flags.values[sel],
    }
    alpha = _alpha(epoch.exptime_s, zp, dzp) if np.isfinite(zp) else float("nan")
    return _PieceData(
        epoch=index,
        piece=piece,
        red=red,
        rx0=rx0,
        ry0=ry0,
        image=image,
        variance=variance,
        mask=mask,
        read_noise_e=red.read_noise_e(piece.quadrant),
        fwhm_px=fwhm if np.isfinite(fwhm) else 2.5,
        centroid=(cdx if np.isfinite(cdx) else 0.0, cdy if np.isfinite(cdy) else 0.0),
        zp=zp,
        zp_err=zp_err,
        dzp=dzp,
        alpha=alpha,
        stars=stars,
        alpha_ubercal=alpha,
        zp_err_ubercal=zp_err,
        wcs=red.wcs(piece.quadrant),
    )


def _psf_candidates(stars: dict[str, np.ndarray], config: LightcurveConfig) -> np.ndarray:
    """Isolated, unsaturated, unflagged stars (a stamp may touch the edge: it is
    then left out by the fit if incomplete), brightest first."""
    ok = ((stars["flags"] & ~_PHOT_EDGE) == 0) & (stars["snr"] >= config.psf_min_snr)
    idx = np.flatnonzero(ok)
    return idx[np.argsort(-stars["snr"][idx])][: config.psf_max_stars]


def _fit_piece_psf(inputs: _Inputs, pd: _PieceData, epoch: Epoch, config: LightcurveConfig):
    s = pd.stars
    far = np.hypot(s["x"] - (pd.piece.x - pd.rx0), s["y"] - (pd.piece.y - pd.ry0)) > 4 * pd.fwhm_px
    idx = _psf_candidates({k: v[far] for k, v in s.items()}, config)
    if len(idx) >= config.psf_min_stars:
        try:
            pd.psf = fit_psf(
                pd.image,
                pd.variance,
                s["x"][far][idx],
                s["y"][far][idx],
                mask=pd.mask != 0,
                fwhm_guess_px=pd.fwhm_px,
                oversample=config.psf_oversample,
            )
            return
        except PSFFitError:
            pass
    pd.psf = inputs.exposure_psf(epoch, pd.fwhm_px, config)
    if pd.psf is None:
        pd.flags |= FLAG_BITS["no_psf"]


# --- frames and maps ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Pixel coordinates of a quadrant offset by an origin, beside a piece's region:
    the scene model's frame (reference quadrant pixels minus an origin near the
    target) and the difference images' reference frame (which may extend beyond
    its quadrant). Positions are measured ones: the WCS sees them minus
    ``centroid``, the photometry stage's offset of the stars from the WCS."""

    wcs: WCS
    rx0: int
    ry0: int
    centroid: tuple[float, float]


def _wcs_map(src: _PieceData | _Frame, dst: _PieceData | _Frame) -> Callable:
    """Exact pixel map: ``src`` pixels -> ``dst`` pixels, through the sky."""

    def f(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = src.wcs.all_pix2world(
            np.ravel(x) + src.rx0 - src.centroid[0], np.ravel(y) + src.ry0 - src.centroid[1], 0
        )
        xd, yd = _world_to_pixel(dst.wcs, ra, dec)
        xd = xd + dst.centroid[0] - dst.rx0
        yd = yd + dst.centroid[1] - dst.ry0
        return xd.reshape(np.shape(x)), yd.reshape(np.shape(y))

    return f


def _affine(
    src: _PieceData | _Frame,
    dst: _PieceData | _Frame,
    at: tuple[float, float],
    *,
    centred: bool = False,
) -> AffineMap:
    """``src`` pixels -> ``dst`` pixels, the exact map (:func:`_wcs_map`)
    linearised at ``src`` position ``at``; ``centred``: from ``src`` pixels minus
    ``at`` (a calibration star's frame)."""
    x, y = _wcs_map(src, dst)(
        np.array([at[0], at[0] + 1.0, at[0]]), np.array([at[1], at[1], at[1] + 1.0])
    )
    m = np.array([[x[1] - x[0], x[2] - x[0]], [y[1] - y[0], y[2] - y[0]]])
    here = np.array([x[0], y[0]])
    return AffineMap(m, here if centred else here - m @ np.asarray(at))


def _stamp(pd: _PieceData, x: float, y: float, half: int):
    """The stamp of (2 half + 1)^2 pixels around region position (x, y), clipped to
    the region; (data, variance, good, photon_scale, x0, y0, partial)."""
    ny, nx = pd.image.shape
    ix, iy = round(x), round(y)
    x0, x1 = (int(np.clip(v, 0, nx)) for v in (ix - half, ix + half + 1))
    y0, y1 = (int(np.clip(v, 0, ny)) for v in (iy - half, iy + half + 1))
    partial = (x1 - x0, y1 - y0) != (2 * half + 1, 2 * half + 1)
    sl = (slice(y0, y1), slice(x0, x1))
    data, var = pd.image[sl].astype(np.float64), pd.variance[sl].astype(np.float64)
    good = (pd.mask[sl] == 0) & np.isfinite(data) & (var > 0)
    k = _photon_scale(data, var, pd.read_noise_e)
    return data, var, good, k, x0, y0, partial


def _scene_image(pd: _PieceData, to_image: AffineMap, x: float, y: float, half: int, config):
    data, var, good, k, x0, y0, partial = _stamp(pd, x, y, half)
    if not good.size or not good.any() or pd.psf is None:
        return None, partial
    return (
        SceneImage(
            data=data,
            variance=var,
            good=good,
            photon_scale=k,
            read_noise_e=pd.read_noise_e,
            x0=x0,
            y0=y0,
            psf=pd.psf,
            alpha=pd.alpha,
            to_image=to_image,
            epoch=pd.epoch,
            alpha_err_mag=pd.zp_err if config.include_zp_errors and np.isfinite(pd.zp_err) else 0.0,
        ),
        partial,
    )


# --- one band of one target ------------------------------------------------------------


@dataclass
class BandResult:
    band: str
    target: Target
    epochs: list[Epoch]
    flux: np.ndarray
    flux_err: np.ndarray
    flags: np.ndarray
    forced_flux: np.ndarray
    forced_err: np.ndarray
    forced_flags: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


def _baseline(target: Target, epochs: list[Epoch]) -> np.ndarray | None:
    mjd = np.array([e.mjd for e in epochs])
    before = np.isfinite(target.no_flux_before) & (mjd < target.no_flux_before)
    after = np.isfinite(target.no_flux_after) & (mjd > target.no_flux_after)
    chosen = before | after
    return chosen if chosen.any() else None


def _fit_with_baseline(images, pos, n, baseline, options) -> tuple[SceneFit, str]:
    if baseline is not None:
        return fit_scene(images, pos, n_epochs=n, baseline=baseline, options=options), "targets"
    # Relative fluxes first (mean zero over every epoch), then the faintest plateau.
    first = fit_scene(images, pos, n_epochs=n, baseline=np.ones(n, bool), options=options)
    chosen = choose_baseline(first.flux_njy, first.flux_err_stat_njy)
    if not chosen.any():
        raise ValueError("no baseline epochs could be found in the light curve")
    return fit_scene(images, first.position, n_epochs=n, baseline=chosen, options=options), "auto"


def measure_band(
    inputs: _Inputs, target: Target, band: str, epochs: list[Epoch], config: LightcurveConfig
) -> BandResult:
    """Scene model, flux scale and the classical comparison of one band."""
    n = len(epochs)
    flags = np.zeros(n, dtype=np.int64)
    pieces: list[_PieceData] = []
    for i, ep in enumerate(epochs):
        if not ep.on_detector:
            flags[i] |= FLAG_BITS["off_detector"]
            continue
        for p in ep.pieces:
            pd = _load_piece(inputs, ep, i, p, config)
            if not np.isfinite(pd.alpha):
                pd.flags |= FLAG_BITS["no_calibration"]
            else:
                _fit_piece_psf(inputs, pd, ep, config)
            pieces.append(pd)
    usable = [pd for pd in pieces if pd.flags == 0]
    for i in range(n):
        mine = [pd for pd in pieces if pd.epoch == i]
        if mine and not any(pd.flags == 0 for pd in mine):
            flags[i] |= np.bitwise_or.reduce([pd.flags for pd in mine])
    result = BandResult(
        band,
        target,
        epochs,
        np.full(n, np.nan),
        np.full(n, np.nan),
        flags,
        np.full(n, np.nan),
        np.full(n, np.nan),
        flags.copy(),
    )
    main = [pd for pd in usable if pd.piece.inside]
    if not main:
        result.flags |= FLAG_BITS["fit_failed"]
        result.attrs["error"] = (
            "no epoch with a calibrated, PSF-modelled quadrant holding the target"
        )
        return result
    ref = min(main, key=lambda pd: pd.psf.params_at(pd.piece.x - pd.rx0, pd.piece.y - pd.ry0)[0])
    origin = (round(ref.piece.x + ref.centroid[0]), round(ref.piece.y + ref.centroid[1]))
    pos0 = (ref.piece.x + ref.centroid[0] - origin[0], ref.piece.y + ref.centroid[1] - origin[1])
    frame = _Frame(ref.wcs, *origin, ref.centroid)
    # The flux scale first: the calibration stars correct each image's alpha
    # before the scene is fitted, so that the galaxy sees the corrected scales.
    scale = _calibration_stars(inputs, epochs, usable, config)
    corr, corr_err, per_epoch_used = scale.correction(
        config.flux_scale, per_epoch_max_err=config.per_epoch_max_err
    )
    for pd in usable:
        pd.alpha *= corr[pd.epoch]
        if per_epoch_used[pd.epoch]:
            # The epoch's stars calibrate it: their ratio's error replaces the zero point's.
            pd.zp_err = _MAG_ERR * corr_err[pd.epoch] / corr[pd.epoch]
    images, owner = [], []
    for pd in usable:
        amap = _affine(frame, pd, pos0)
        xt, yt = amap(*pos0)
        half = int(np.ceil(config.stamp_half_fwhm * pd.fwhm_px))
        img, partial = _scene_image(pd, amap, float(xt), float(yt), half, config)
        if partial and pd.piece.inside:
            result.flags[pd.epoch] |= FLAG_BITS["partial"]
        if img is not None:
            images.append(img)
            owner.append(pd)
    baseline = _baseline(target, epochs)
    options = config.scene_options()
    try:
        fit, how = _fit_with_baseline(images, pos0, n, baseline, options)
    except ValueError as err:
        result.flags |= FLAG_BITS["fit_failed"]
        result.attrs["error"] = str(err)
        return result
    result.flux = fit.flux_njy.copy()
    result.flux_err = fit.flux_err_njy.copy()
    for k, (img, pd) in enumerate(zip(images, owner, strict=True)):
        if fit.npix_image[k] and fit.chi2_image[k] / fit.npix_image[k] > config.poor_fit_chi2:
            result.flags[pd.epoch] |= FLAG_BITS["poor_fit"]
        if pd.piece.inside:
            xt, yt = img.to_image(*fit.position)
            near = (np.abs(np.arange(pd.mask.shape[1]) - xt)[None, :] <= pd.fwhm_px) & (
                np.abs(np.arange(pd.mask.shape[0]) - yt)[:, None] <= pd.fwhm_px
            )
            if np.any((pd.mask != 0) & near):
                result.flags[pd.epoch] |= FLAG_BITS["masked_core"]
    bad = (result.flags & _NO_FLUX) != 0
    result.flux[bad] = np.nan
    result.flux_err[bad] = np.nan
    ra, dec = ref.wcs.all_pix2world(
        fit.position[0] + origin[0] - ref.centroid[0],
        fit.position[1] + origin[1] - ref.centroid[1],
        0,
    )
    scale_px = float(np.sqrt(abs(np.linalg.det(ref.wcs.pixel_scale_matrix)))) * 3600.0
    result.attrs.update(
        {
            "reference_image": {"expid": epochs[ref.epoch].expid, "quadrant": ref.piece.quadrant},
            "chi2": fit.chi2,
            "dof": fit.dof,
            "chi2_dof": fit.chi2_dof,
            "n_images": len(images),
            "n_clipped_pixels": fit.n_clipped,
            "converged": fit.converged,
            "position_fitted": fit.position_fitted,
            "ra_fit": float(ra),
            "dec_fit": float(dec),
            "position_err_arcsec": (fit.position_err * scale_px).tolist(),
            "baseline": {
                "source": how,
                "mode": config.baseline_mode,
                "expids": [epochs[i].expid for i in np.flatnonzero(fit.baseline)],
            },
            "flux_scale": {
                **scale.as_dict(),
                "applied": config.flux_scale,
                "per_epoch_epochs": int(per_epoch_used.sum()),
            },
            "flux_scale_correction": scale.ratio if config.flux_scale != "none" else 1.0,
            "flux_scale_correction_err": scale.ratio_err if config.flux_scale != "none" else 0.0,
            "epochs_qa": _epochs_qa(epochs, owner, images, fit),
        }
    )
    if config.forced:
        _forced(inputs, result, usable, ref, frame, fit, config)
    return result


def _epochs_qa(epochs, owner, images, fit) -> dict[str, list]:
    """Per-epoch diagnostics of the image holding the target (lists, JSON)."""
    n = len(epochs)
    qa = {k: [None] * n for k in ("quadrant", "x", "y", "fwhm_px", "zp", "dzp", "chi2_per_pixel")}
    for k, (_img, pd) in enumerate(zip(images, owner, strict=True)):
        if not pd.piece.inside:
            continue
        i = pd.epoch
        qa["quadrant"][i] = pd.piece.quadrant
        qa["x"][i], qa["y"][i] = pd.piece.x, pd.piece.y
        qa["fwhm_px"][i] = float(pd.psf.fwhm_px) if pd.psf is not None else None
        qa["zp"][i], qa["dzp"][i] = pd.zp, pd.dzp
        npix = int(fit.npix_image[k])
        qa["chi2_per_pixel"][i] = float(fit.chi2_image[k] / npix) if npix else None
    return qa


# --- calibration stars ---------------------------------------------------------------------


def _calibration_stars(inputs, epochs, usable, config) -> FluxScale:
    """Fit the clean reference stars around the target with the same estimator
    (no galaxy) and compare with their ubercal magnitudes."""
    ub = inputs.ubercal(epochs[0].band)
    seen = _star_images(usable, config)
    known = _catalog_rows(ub, list(seen))
    seen = {sid: rows for sid, rows in seen.items() if sid in known}
    # Most epochs first, then the brightest.
    chosen = sorted(
        seen.items(),
        key=lambda kv: (
            -len({pd.epoch for pd, _ in kv[1]}),
            -max(pd.stars["snr"][k] for pd, k in kv[1]),
        ),
    )[: config.calib_max_stars]
    n = len(epochs)
    options = SceneFitOptions(
        galaxy=False, fit_position=True, position_min_snr=0.0, clip_sigma=config.clip_sigma
    )
    star_flux: dict[int, dict[int, tuple[float, float]]] = {}
    for sid, rows in chosen:
        first, k0 = rows[0]
        # The star's frame: its first image's pixels; the WCS maps it to the others.
        at = (first.stars["x"][k0], first.stars["y"][k0])
        images = []
        for pd, _k in rows:
            amap = _affine(first, pd, at, centred=True)
            half = int(np.ceil(config.stamp_half_fwhm * pd.fwhm_px))
            xs, ys = amap(0.0, 0.0)
            img, partial = _scene_image(pd, amap, float(xs), float(ys), half, config)
            if img is not None and not partial:
                images.append(img)
        if len(images) < 2:
            continue
        try:
            fit = fit_scene(images, (0.0, 0.0), n_epochs=n, options=options)
        except ValueError:
            continue
        ok = np.flatnonzero(np.isfinite(fit.flux_njy))
        star_flux[sid] = {int(e): (fit.flux_njy[e], fit.flux_err_stat_njy[e]) for e in ok}
    return _catalog_scale(ub, star_flux, n)


def _star_images(usable, config) -> dict[int, list[tuple[_PieceData, int]]]:
    """Clean stars of S/N >= calib_min_snr away from the target, by source_id:
    (piece, catalog row) of every image they are in."""
    seen: dict[int, list[tuple[_PieceData, int]]] = {}
    for pd in usable:
        s = pd.stars
        dist = np.hypot(s["x"] - (pd.piece.x - pd.rx0), s["y"] - (pd.piece.y - pd.ry0))
        ok = (s["flags"] == 0) & (s["snr"] >= config.calib_min_snr) & (dist > 4 * pd.fwhm_px)
        for k in np.flatnonzero(ok):
            seen.setdefault(int(s["source_id"][k]), []).append((pd, int(k)))
    return seen


def _catalog_rows(ub: xr.Dataset, source_ids) -> dict[int, int]:
    """Row in ubercal/<band> of each usable calibration star (a magnitude, not
    rejected as variable)."""
    ids = ub.source_id.values
    out = {}
    for sid in source_ids:
        p = int(np.searchsorted(ids, sid)) if len(ids) else 0
        if (
            p < len(ids)
            and ids[p] == sid
            and np.isfinite(ub.star_mag.values[p])
            and not bool(ub.star_rejected.values[p])
        ):
            out[int(sid)] = p
    return out


# --- the classical comparison ---------------------------------------------------------------


def _reference(inputs, result: BandResult, ref: _PieceData, baseline: np.ndarray, config):
    """The baseline exposures, every quadrant near the target, resampled onto a
    frame around the target in the reference's pixels, on the reference's scale."""
    h = config.forced_cutout_px // 2 + 8
    frame = _Frame(ref.wcs, round(ref.piece.x) - h, round(ref.piece.y) - h, ref.centroid)
    parts = []
    for i in np.flatnonzero(baseline):
        ep = result.epochs[i]
        red = inputs.reduced(ep.night, ep.expid)
        ny, nx = red.shape
        for q in red.quadrants:
            x, y = _world_to_pixel(
                red.wcs(int(q)), np.array([result.target.ra_deg]), np.array([result.target.dec_deg])
            )
            if not (-h < x[0] < nx - 1 + h and -h < y[0] < ny - 1 + h):
                continue
            pd = _load_piece(
                inputs, ep, int(i), Piece(int(q), float(x[0]), float(y[0]), False), config, half=h
            )
            if not np.isfinite(pd.alpha):
                continue
            parts.append(
                ReferencePart(
                    pd.image, pd.variance, pd.mask == 0, _wcs_map(frame, pd), ref.alpha / pd.alpha
                )
            )
    if not parts:
        return None
    image, variance, _ = build_reference(parts, (2 * h + 1, 2 * h + 1))
    return frame, image, variance


def _forced(inputs, result: BandResult, usable, ref, scene: _Frame, fit, config) -> None:
    """Forced photometry on difference images against a baseline reference,
    calibrated like the scene model: ubercal scales, then the stars' ratio."""
    n = len(result.epochs)
    result.forced_flags = result.flags.copy()
    built = _reference(inputs, result, ref, fit.baseline, config)
    if built is None:
        result.forced_flags |= FLAG_BITS["fit_failed"]
        result.attrs["forced_error"] = "no calibrated baseline image for the reference"
        return
    frame, reference, ref_var = built
    star_flux: dict[int, dict[int, tuple[float, float]]] = {}
    alpha = {}
    for pd in usable:
        if not pd.piece.inside:
            continue
        amap = _affine(scene, pd, tuple(fit.position))
        xt, yt = (float(v) for v in amap(*fit.position))
        h = config.forced_cutout_px // 2
        ny, nx = pd.image.shape
        x0, x1 = max(0, round(xt) - h), min(nx, round(xt) + h)
        y0, y1 = max(0, round(yt) - h), min(ny, round(yt) + h)
        new = pd.image[y0:y1, x0:x1].astype(np.float64)
        new_var = pd.variance[y0:y1, x0:x1].astype(np.float64)
        to_frame = _wcs_map(pd, frame)
        shifted = lambda x, y, f=to_frame, a=x0, b=y0: f(x + a, y + b)  # noqa: E731
        # Back from the reference's scale to this image's (the ubercal scales:
        # alpha is not yet corrected by the stars here).
        scale = pd.alpha_ubercal / ref.alpha_ubercal
        r, covered = resample(reference, shifted, new.shape, order=3)
        rv, _ = resample(ref_var, shifted, new.shape, order=1)
        s = pd.stars
        ok = (s["flags"] == 0) & (s["snr"] >= config.calib_min_snr)
        key = str(result.epochs[pd.epoch].expid)
        try:
            # The difference is made on the part of the cutout the reference
            # covers: a kernel fitted where one image is missing matches nothing.
            cy, cx = _covered_box(covered, round(yt) - y0, round(xt) - x0)
            masked = pd.mask[y0:y1, x0:x1] != 0
            df = difference_flux(
                (r * scale)[cy, cx],
                (rv * scale**2)[cy, cx],
                np.where(masked, r * scale, new)[cy, cx],
                new_var[cy, cx],
                xt - x0 - cx.start,
                yt - y0 - cy.start,
                read_noise_e=pd.read_noise_e,
                kernel_min_peak_snr=config.forced_kernel_snr,
                star_x=s["x"][ok] - x0 - cx.start,
                star_y=s["y"][ok] - y0 - cy.start,
                valid=covered[cy, cx],
                seed=int(result.epochs[pd.epoch].expid) % (2**31),
            )
            if not np.isfinite(df.flux_e):
                raise ValueError(
                    "the transient is within the difference PSF's half-width of the quadrant edge"
                )
        except ValueError as err:
            result.forced_flags[pd.epoch] |= FLAG_BITS["fit_failed"]
            result.attrs.setdefault("forced_failures", {})[key] = str(err)
            continue
        a = pd.alpha_ubercal
        alpha[pd.epoch] = a
        result.forced_flux[pd.epoch] = df.flux_e / a
        zp_part = 0.4 * math.log(10.0) * (pd.zp_err_ubercal if config.include_zp_errors else 0.0)
        result.forced_err[pd.epoch] = math.hypot(df.flux_err_e / a, zp_part * df.flux_e / a)
        for sid, f, e in zip(s["source_id"][ok], df.star_flux_e, df.star_flux_err_e, strict=True):
            star_flux.setdefault(int(sid), {})[pd.epoch] = (f / a, e / a)
    scale = _catalog_scale(inputs.ubercal(result.band), star_flux, n)
    corr, corr_err, own = scale.correction(
        config.flux_scale, per_epoch_max_err=config.per_epoch_max_err
    )
    result.forced_flux /= corr
    result.forced_err = np.hypot(
        result.forced_err / corr, np.where(own, result.forced_flux * corr_err / corr, 0.0)
    )
    bad = (result.forced_flags & _NO_FLUX) != 0
    result.forced_flux[bad] = np.nan
    result.forced_err[bad] = np.nan
    result.attrs["forced_flux_scale"] = {
        **scale.as_dict(),
        "applied": config.flux_scale,
        "per_epoch_epochs": int(own.sum()),
    }


def _covered_box(covered: np.ndarray, iy: int, ix: int) -> tuple[slice, slice]:
    """The largest rows x columns box around (iy, ix) whose rows and columns are
    (almost) fully covered; ValueError when the target is not covered."""
    if not (0 <= iy < covered.shape[0] and 0 <= ix < covered.shape[1]) or not covered[iy, ix]:
        raise ValueError("the reference does not cover the transient")
    box = [slice(0, covered.shape[0]), slice(0, covered.shape[1])]
    for _ in range(3):
        sub = covered[box[0], box[1]]
        rows = np.flatnonzero(sub.mean(axis=1) > 0.98) + box[0].start
        cols = np.flatnonzero(sub.mean(axis=0) > 0.98) + box[1].start
        rows = _run_around(rows, iy)
        cols = _run_around(cols, ix)
        if rows is None or cols is None:
            raise ValueError("the reference covers too little around the transient")
        box = [rows, cols]
    if min(box[0].stop - box[0].start, box[1].stop - box[1].start) < 48:
        raise ValueError("the reference covers less than 48 px around the transient")
    return box[0], box[1]


def _run_around(idx: np.ndarray, centre: int) -> slice | None:
    """The run of consecutive indices containing ``centre``."""
    if centre not in idx:
        return None
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks + 1, [len(idx)]])
    for a, b in zip(starts, stops, strict=True):
        if idx[a] <= centre <= idx[b - 1]:
            return slice(int(idx[a]), int(idx[b - 1]) + 1)
    return None


def _catalog_scale(ub: xr.Dataset, star_flux: dict[int, dict[int, tuple[float, float]]], n: int):
    """measure_flux_scale on {source_id: {epoch: (flux, err)}} against ubercal."""
    rows = list(_catalog_rows(ub, list(star_flux)).items())
    flux = np.full((len(rows), n), np.nan)
    err = np.full((len(rows), n), np.nan)
    mag = np.array([ub.star_mag.values[p] for _, p in rows])
    cat = 10 ** (-0.4 * (mag - AB_NJY_ZERO_POINT))
    cat_err = cat * np.array([ub.star_mag_err.values[p] for _, p in rows]) / _MAG_ERR
    for j, (sid, _) in enumerate(rows):
        for e, (f, fe) in star_flux[sid].items():
            flux[j, e], err[j, e] = f, fe
    return measure_flux_scale(flux, err, cat, cat_err)


# --- the whole target ----------------------------------------------------------------------


def _mags(flux: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.isfinite(flux) & (flux > 0)
    safe = np.where(pos, flux, 1.0)
    mag = np.where(pos, -2.5 * np.log10(safe) + AB_NJY_ZERO_POINT, np.nan)
    return mag, np.where(pos, _MAG_ERR * err / safe, np.nan)


def lightcurve_dataset(results: list[BandResult], *, forced: bool = False) -> xr.Dataset:
    """The ``lightcurves/<name>`` (or ``lightcurves_forced/<name>``) content."""
    rows = [(ep, r, i) for r in results for i, ep in enumerate(r.epochs)]
    rows.sort(key=lambda t: (t[0].mjd, t[0].expid))
    pick = lambda attr: np.array([getattr(r, attr)[i] for _, r, i in rows])  # noqa: E731
    flux = pick("forced_flux" if forced else "flux").astype(np.float64)
    err = pick("forced_err" if forced else "flux_err").astype(np.float64)
    flags = pick("forced_flags" if forced else "flags").astype(np.int64)
    mag, mag_err = _mags(flux, err)
    return xr.Dataset(
        {
            "expid": ("epoch", np.array([ep.expid for ep, _, _ in rows], dtype=np.int64)),
            "mjd": ("epoch", np.array([ep.mjd for ep, _, _ in rows], dtype=np.float64)),
            "band": ("epoch", np.array([ep.band for ep, _, _ in rows], dtype=object)),
            "flux_njy": ("epoch", flux),
            "flux_njy_err": ("epoch", err),
            "mag": ("epoch", mag),
            "mag_err": ("epoch", mag_err),
            "flags": ("epoch", flags),
        }
    )


def measure_target(
    store: str, target: Target, epochs: list[Epoch], config: LightcurveConfig
) -> dict[str, Any]:
    """Measure and write one target's light curves; returns a small summary."""
    inputs = _Inputs(store)
    bands = sorted({e.band for e in epochs} & set(config.bands or ("g", "r", "i")))
    results = [
        measure_band(inputs, target, b, [e for e in epochs if e.band == b], config) for b in bands
    ]
    attrs = provenance(
        "lightcurves",
        config=config,
        inputs={
            "nights": sorted({e.night for e in epochs}),
            "ubercal": [groups.ubercal(b) for b in bands],
        },
        target=target.as_dict(),
        scene_options=config.scene_options().as_dict(),
        flag_bits=FLAG_BITS,
        flux_convention="flux_njy = 10**(-0.4 (m - 31.4)), m = m_inst + zp + dzp "
        "(+ the exposure gradient term when ubercal fitted one)",
        bands={
            r.band: {k: v for k, v in r.attrs.items() if not k.startswith("forced")}
            for r in results
        },
    )
    write_group(store, groups.lightcurve(target.name), lightcurve_dataset(results), attrs=attrs)
    summary: dict[str, Any] = {
        "name": target.name,
        "epochs": len(epochs),
        "measured": int(sum(np.isfinite(r.flux).sum() for r in results)),
        "bands": {
            r.band: {"chi2_dof": r.attrs.get("chi2_dof"), "error": r.attrs.get("error")}
            for r in results
        },
    }
    if config.forced:
        forced_attrs = {
            **attrs,
            "method": "forced PSF photometry on difference images (calib/forced.py)",
            "bands": {
                r.band: {k: v for k, v in r.attrs.items() if k.startswith("forced")}
                for r in results
            },
        }
        write_group(
            store,
            groups.lightcurve_forced(target.name),
            lightcurve_dataset(results, forced=True),
            attrs=forced_attrs,
        )
        summary["forced_measured"] = int(sum(np.isfinite(r.forced_flux).sum() for r in results))
    run_logger(__name__).info("%s: %s", groups.lightcurve(target.name), summary)
    return summary


def plan(store: str, targets_path: str | os.PathLike, nights: list[str] | None = None):
    """Targets and their epochs, as small plain values for the task map."""
    targets = read_targets(targets_path)
    epochs = plan_targets(store, targets, nights=nights)
    return [(t, epochs[t.name]) for t in targets]


def run_lightcurves(
    store: str,
    targets_path: str | os.PathLike,
    *,
    config: LightcurveConfig | None = None,
    nights: list[str] | None = None,
) -> dict[str, Any]:
    """The stage in this process, without Prefect (tests, benchmarks)."""
    config = config or LightcurveConfig()
    return {
        t.name: measure_target(store, t, ep, config) for t, ep in plan(store, targets_path, nights)
    }


# --- Prefect adapters --------------------------------------------------------------------------


@task(name="plan-lightcurves", retries=1, retry_delay_seconds=2)
def plan_lightcurves_task(
    store: str, targets_path: str, nights: list[str] | None
) -> list[tuple[Target, list[Epoch]]]:
    """Read the targets table and find each target's kept exposures."""
    planned = plan(store, targets_path, nights)
    run_logger(__name__).info(
        "lightcurves: %d targets, %d epochs", len(planned), sum(len(e) for _, e in planned)
    )
    return planned


@task(name="lightcurve-target", retries=1, retry_delay_seconds=5)
def lightcurve_task(
    store: str, planned: tuple[Target, list[Epoch]], config: LightcurveConfig
) -> dict[str, Any]:
    """One target: its scene-model and difference-image light curves."""
    target, epochs = planned
    return measure_target(store, target, epochs, config)
