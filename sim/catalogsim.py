"""Catalog-level survey simulation for ubercal: observations of reference stars
as the photometry stage would list them, without rendering pixels.

The geometry is that of a real tiled survey: fields on a grid on the sky that
overlap by a few per cent, each visited several times over several nights with
a dither, seen through the focal plane of :mod:`sim.camera` (quadrant layout,
CCD gaps). Which star lands on which quadrant and superpixel cell follows from
the pointing, never from a random star-exposure assignment (that would make the
observation graph an expander and Krylov solvers look artificially good).

Photometry follows the pixel simulator's conventions (docs/simulator.md)::

    m = m_inst + zp(exp, q) + dzp_starflat(q, x, y)
    zp(exp, q) = ZP_b - k_b X - cloud(exp, q) - telemetry(exp) + dq(q)

with the starflat pattern of :class:`sim.instrument.Instrument`, the extinction
and sky of :mod:`sim.schedule`, grey clouds on cloudy nights (with a gradient
over the focal plane, so quadrants of one exposure differ, and stars within a
quadrant see a little of it), a static per-quadrant offset ``dq`` (a flat
normalisation / gain error that a per-exposure zero point cannot absorb), 3 %
variable stars and cosmic-ray hits. Magnitude errors are the aperture-photometry
noise of the pixel simulator (photon noise of star and sky, read noise, aperture
of 1.5 FWHM) plus a systematic floor; noise is drawn Gaussian in magnitude.
Sky positions live on a tangent plane (no optical distortion at this level).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass

import numpy as np

from calib.bits import FLAG_SATURATED
from calib.ubercal import ReferenceStars
from sim._random import rng_for
from sim.camera import Camera
from sim.catalog import BP_RP_PIVOT
from sim.config import CameraConfig, make_config
from sim.instrument import Instrument
from sim.schedule import (
    EXTINCTION_PER_AIRMASS,
    SKY_MAG_ARCSEC2,
    cloud_curve,  # the pixel simulator's grey-cloud curve, shared rather than copied
    night_start_mjd,
    telemetry_zp_loss_mag,
)

__all__ = [
    "TRUTH_COLUMNS",
    "CatalogSurvey",
    "CatalogSurveyConfig",
    "CatalogSurveyPlan",
    "plan_catalog_survey",
    "simulate_catalog_survey",
]

_MAG_PER_LN = 2.5 / math.log(10.0)


@dataclass(frozen=True, kw_only=True)
class CatalogSurveyConfig:
    """A catalog-level survey. Defaults: the 16-quadrant focal plane (CCDs 6, 7,
    10, 11) at full ZTF quadrant size and the ``ztf`` preset's star density.

    Attributes
    ----------
    seed : int
        Seed of every random draw.
    band : {'g', 'r', 'i'}
        The band observed.
    ccd_cols, ccd_rows : tuple of int
        Mosaic columns and rows of the CCDs (4 quadrants each).
    quad_nx, quad_ny : int, pixels
        Data-section size of a quadrant.
    pixel_scale_arcsec : float, arcsec
        Pixel scale.
    n_fields_x, n_fields_y : int
        Fields of the tiling along the two sky axes.
    field_overlap : float
        Fractional overlap of neighbouring fields (a few per cent).
    visits_per_field : int
        Dithered visits of each field, spread over the nights.
    n_nights : int
        Nights of the survey; the first is clear, the second cloudy.
    first_night : str
        Local date of the first night, YYYY-MM-DD.
    dither_fraction : float
        Dithers are uniform within +-fraction of the focal-plane size.
    stars_per_quadrant : float
        Stars with 13 < m < 22 over one quadrant's area (``ztf`` preset: 10,000).
    mag_range : (float, float), mag
        Magnitudes drawn; stars fainter than ``mag_range[1]`` are never detected.
    snr_min : float
        Observations are listed when their expected S/N reaches this (a cut on
        the reference magnitude, as real ubercal selections are).
    exptime_s : float, s
        Exposure time.
    noise_floor_mag : float, mag
        Systematic per-observation scatter added in quadrature to the reported
        photometric error (the reported ``mag_inst_err`` does not include it).
    quadrant_offset_rms_mag : float, mag
        Rms of the static per-quadrant zero-point offset.
    cloudy_fraction : float
        Probability that a night after the second is cloudy.
    cloud_gradient_rms_mag : float, mag
        Cloud extinction gradient per corner radius of the focal plane.
    variable_fraction : float
        Fraction of variable stars (sinusoids of 0.05-0.5 mag, 0.1-10 d).
    cosmic_fraction : float
        Fraction of observations hit by a cosmic ray (adds 500-20,000 e-).
    refcat_limit_mag : float, mag
        Stars brighter than this are in the reference catalog.
    starflat_amplitude_mag : float, mag
        Scale of the starflat pattern (the pixel simulator's default).
    cells : (int, int)
        Superpixel grid (ny, nx) of the truth starflat cell means.
    secondary_grid : bool
        Also visit a secondary grid of fields offset by half a field in both
        axes (as ZTF's secondary grid), each as often as a primary field.
    """

    seed: int = 0
    band: str = "r"
    ccd_cols: tuple[int, ...] = (1, 2)
    ccd_rows: tuple[int, ...] = (1, 2)
    quad_nx: int = 3072
    quad_ny: int = 3080
    pixel_scale_arcsec: float = 1.0
    n_fields_x: int = 3
    n_fields_y: int = 2
    field_overlap: float = 0.03
    visits_per_field: int = 6
    n_nights: int = 3
    first_night: str = "2026-03-10"
    dither_fraction: float = 0.1
    stars_per_quadrant: float = 10_000.0
    mag_range: tuple[float, float] = (13.0, 21.0)
    snr_min: float = 5.0
    exptime_s: float = 30.0
    noise_floor_mag: float = 0.005
    quadrant_offset_rms_mag: float = 0.02
    cloudy_fraction: float = 0.5
    cloud_gradient_rms_mag: float = 0.015
    variable_fraction: float = 0.03
    cosmic_fraction: float = 0.002
    refcat_limit_mag: float = 21.0
    starflat_amplitude_mag: float = 0.010
    cells: tuple[int, int] = (10, 10)
    secondary_grid: bool = False

    def __post_init__(self) -> None:
        if self.band not in EXTINCTION_PER_AIRMASS:
            raise ValueError(f"band must be one of g, r, i, got {self.band!r}")
        for name in ("n_fields_x", "n_fields_y", "visits_per_field", "n_nights"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.field_overlap < 0.5:
            raise ValueError(f"field_overlap must be in [0, 0.5), got {self.field_overlap}")

    def replace(self, **changes: object) -> CatalogSurveyConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CatalogSurvey:
    """A simulated survey at catalog level, with its truth.

    Attributes
    ----------
    config : CatalogSurveyConfig
    observations : dict of str to ndarray, shape (n_obs,)
        The night-catalog columns (docs/store.md): ``expid``, ``quadrant``,
        ``source_id``, ``x``, ``y`` (0-based data-section pixels), ``flux``,
        ``flux_err`` [e-], ``mag_inst``, ``mag_inst_err`` [mag], ``flags``.
    exposures : dict of str to ndarray, shape (n_exp,)
        ``expid``, ``night`` (str), ``mjd``, ``band``, ``airmass``, ``exptime_s``,
        ``field``, ``cloud_mag``.
    stars : dict of str to ndarray, shape (n_star,)
        ``source_id``, ``ra``, ``dec``, ``bp_rp``, ``mag`` (true mean, survey
        system), ``ref_mag``, ``ref_magerr`` (as the reference catalog reports),
        ``in_refcat``, ``var_amp_mag``.
    zp_true : ndarray, shape (n_exp, n_quadrant_ids), mag
        True zero point at each quadrant's centre, indexed by exposure row and
        quadrant id (NaN for quadrants the camera does not have).
    starflat_true : ndarray, shape (n_quadrant_ids, ncy, ncx), mag
        Mean of the true starflat over each superpixel cell.
    truth : dict of str to ndarray, shape (n_obs,)
        Per observation: ``mag_true`` (at that time), ``zp_true`` (at the star),
        ``dzp_true``, ``is_cosmic``, ``is_variable``.
    quadrants : ndarray of int
        Quadrant ids of the camera.
    """

    config: CatalogSurveyConfig
    observations: dict[str, np.ndarray]
    exposures: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    zp_true: np.ndarray
    starflat_true: np.ndarray
    truth: dict[str, np.ndarray]
    quadrants: np.ndarray

    @property
    def n_obs(self) -> int:
        return len(self.observations["expid"])

    def reference_stars(self) -> ReferenceStars:
        """The reference catalog in the survey's band, as ubercal takes it."""
        return _reference_stars(self.stars)

    def night_slices(self) -> dict[str, np.ndarray]:
        """Observation rows of each night, for writing one catalog per night."""
        night_of_exp = dict(zip(self.exposures["expid"], self.exposures["night"], strict=True))
        nights = np.array([night_of_exp[e] for e in self.exposures["expid"]])
        exp_rows = np.searchsorted(self.exposures["expid"], self.observations["expid"])
        obs_night = nights[exp_rows]
        return {n: np.flatnonzero(obs_night == n) for n in np.unique(nights)}


def _camera(cfg: CatalogSurveyConfig) -> tuple[Camera, Instrument]:
    cam_cfg = CameraConfig(
        ccd_cols=cfg.ccd_cols,
        ccd_rows=cfg.ccd_rows,
        quad_nx=cfg.quad_nx,
        quad_ny=cfg.quad_ny,
        pixel_scale_arcsec=cfg.pixel_scale_arcsec,
    )
    base = make_config("ztf", seed=cfg.seed)
    inst_cfg = dataclasses.replace(
        base.instrument, starflat_amplitude_mag=cfg.starflat_amplitude_mag
    )
    survey_cfg = base.replace(camera=cam_cfg, instrument=inst_cfg)
    camera = Camera(cam_cfg)
    return camera, Instrument(survey_cfg, camera)


def _draw_stars(cfg: CatalogSurveyConfig, area_deg2: float, box: tuple[float, float]) -> dict:
    rng = rng_for(cfg.seed, "catalogsim-stars")
    quad_area = cfg.quad_nx * cfg.quad_ny * (cfg.pixel_scale_arcsec / 3600.0) ** 2
    lo, hi = cfg.mag_range
    # The density is quoted for 13 < m < 22; counts grow as 10^(0.3 m).
    frac = (10 ** (0.3 * hi) - 10 ** (0.3 * lo)) / (10 ** (0.3 * 22.0) - 10**3.9)
    n = int(rng.poisson(cfg.stars_per_quadrant / quad_area * area_deg2 * frac))
    sx = rng.uniform(-box[0], box[0], size=n)
    sy = rng.uniform(-box[1], box[1], size=n)
    a, b = 10 ** (0.3 * lo), 10 ** (0.3 * hi)
    mag = np.log10(a + rng.uniform(size=n) * (b - a)) / 0.3
    bp_rp = np.clip(rng.normal(1.0, 0.45, size=n), 0.1, 3.5)
    base = make_config("ztf").instrument
    ref_mag = mag - base.colour_term[cfg.band] * (bp_rp - BP_RP_PIVOT)
    ref_magerr = 0.002 + 0.03 * 10 ** (0.4 * (ref_mag - 21.0))
    variable = rng.uniform(size=n) < cfg.variable_fraction
    order = np.argsort(sx, kind="stable")
    ids = np.sort(rng.choice(2**50, size=n, replace=False).astype(np.int64) + 10**15)
    stars = {
        "sx": sx,
        "sy": sy,
        "mag": mag,
        "bp_rp": bp_rp,
        "ref_mag": ref_mag + ref_magerr * rng.standard_normal(n),
        "ref_magerr": ref_magerr,
        "var_amp_mag": np.where(variable, rng.uniform(0.05, 0.5, size=n), 0.0),
        "var_period_d": np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=n)),
        "var_phase": rng.uniform(0, 2 * np.pi, size=n),
    }
    # Sorted along sx so that the stars under a pointing are one searchsorted away.
    stars = {k: v[order] for k, v in stars.items()}
    stars["source_id"] = ids[rng.permutation(n)][order] if n else ids
    stars["in_refcat"] = stars["mag"] < cfg.refcat_limit_mag
    return stars


def _schedule(cfg: CatalogSurveyConfig, field_step: tuple[float, float], fp_size: tuple) -> dict:
    """Visits: every field ``visits_per_field`` times, round-robin over nights."""
    rng = rng_for(cfg.seed, "catalogsim-schedule")
    nfx, nfy = cfg.n_fields_x, cfg.n_fields_y
    fields = [(float(i), float(j)) for j in range(nfy) for i in range(nfx)]
    if cfg.secondary_grid:
        # ZTF-like: a second grid shifted by half a field, filling the gaps.
        fields += [(i + 0.5, j + 0.5) for j in range(nfy - 1) for i in range(nfx - 1)]
    rows = []
    first = dt.date.fromisoformat(cfg.first_night)
    for night_index in range(cfg.n_nights):
        visits = [
            (f, v)
            for v in range(cfg.visits_per_field)
            if v % cfg.n_nights == night_index
            for f in range(len(fields))
        ]
        night = (first + dt.timedelta(days=night_index)).isoformat()
        t0 = night_start_mjd(night, -116.865, 20.0)
        cloudy = night_index == 1 or (night_index > 1 and rng.uniform() < cfg.cloudy_fraction)
        hours = np.linspace(0.0, 8.0, max(len(visits), 1), endpoint=False)
        clouds = cloud_curve(rng_for(cfg.seed, "clouds", night_index), hours)
        for k, (f, _v) in enumerate(visits):
            i, j = fields[f]
            cx = (i - (nfx - 1) / 2) * field_step[0]
            cy = (j - (nfy - 1) / 2) * field_step[1]
            dx, dy = rng.uniform(-1, 1, size=2) * cfg.dither_fraction * np.asarray(fp_size)
            grad = rng.normal(0.0, cfg.cloud_gradient_rms_mag, size=2) if cloudy else (0.0, 0.0)
            temp, rhum, wind = rng.uniform(4, 20), rng.uniform(15, 90), rng.gamma(2.0, 2.5)
            rows.append(
                {
                    "night": night,
                    "mjd": t0 + hours[k] / 24.0,
                    "field": f,
                    "px": cx + dx,
                    "py": cy + dy,
                    "airmass": 1.0 + 0.8 * rng.uniform() ** 2,
                    "cloud_mag": float(clouds[k]) if cloudy else 0.0,
                    "grad_x": float(grad[0]),
                    "grad_y": float(grad[1]),
                    "telemetry_mag": float(telemetry_zp_loss_mag(temp, rhum, wind)),
                }
            )
    out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out["expid"] = 200_000_000 + np.arange(len(rows), dtype=np.int64)
    return out


def _reference_stars(st: dict[str, np.ndarray]) -> ReferenceStars:
    mag = np.where(st["in_refcat"], st["ref_mag"], np.nan)
    return ReferenceStars(st["source_id"], mag, st["ref_magerr"], st["bp_rp"])


@dataclass(frozen=True)
class CatalogSurveyPlan:
    """A survey without its observations: pointings, stars and truth, from which
    each exposure's catalog is drawn on demand (:meth:`exposure_catalog`, the
    same arrays whenever and in whatever order it is asked), so that a survey of
    any size can be generated one piece at a time.

    Attributes
    ----------
    config : CatalogSurveyConfig
    exposures, stars, zp_true, starflat_true, quadrants
        As in :class:`CatalogSurvey`.
    """

    config: CatalogSurveyConfig
    exposures: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    zp_true: np.ndarray
    starflat_true: np.ndarray
    quadrants: np.ndarray
    camera: Camera
    instrument: Instrument
    sky_stars: dict[str, np.ndarray]  # sorted along the sky x axis
    schedule: dict[str, np.ndarray]  # per exposure row: pointing, clouds, gradients
    quadrant_offset: np.ndarray  # (n_quadrant_ids,) mag

    @property
    def n_exposures(self) -> int:
        return len(self.exposures["expid"])

    def reference_stars(self) -> ReferenceStars:
        """The reference catalog in the survey's band, as ubercal takes it."""
        return _reference_stars(self.stars)

    def exposure_catalog(self, e: int) -> dict[str, np.ndarray]:
        """The catalog of exposure row ``e``: the observation columns of
        :attr:`CatalogSurvey.observations` and the per-observation truth columns
        (``mag_true``, ``zp_true``, ``dzp_true``, ``is_variable``,
        ``is_cosmic``), sorted by (quadrant, source_id)."""
        return _observe(self, e)


def plan_catalog_survey(config: CatalogSurveyConfig | None = None) -> CatalogSurveyPlan:
    """Lay out a survey (stars, pointings, truth) without drawing its catalogs.

    Parameters
    ----------
    config : CatalogSurveyConfig, optional
        The survey; defaults to :class:`CatalogSurveyConfig()`.
    """
    cfg = config or CatalogSurveyConfig()
    camera, instrument = _camera(cfg)
    scale_deg = cfg.pixel_scale_arcsec / 3600.0
    fp = (camera.mosaic_nx * scale_deg, camera.mosaic_ny * scale_deg)
    step = (fp[0] * (1 - cfg.field_overlap), fp[1] * (1 - cfg.field_overlap))
    box = (
        0.5 * ((cfg.n_fields_x - 1) * step[0] + fp[0]) + cfg.dither_fraction * fp[0],
        0.5 * ((cfg.n_fields_y - 1) * step[1] + fp[1]) + cfg.dither_fraction * fp[1],
    )
    stars = _draw_stars(cfg, 4 * box[0] * box[1], box)
    exps = _schedule(cfg, step, fp)
    qids = camera.quadrant_ids
    n_qid = int(qids.max()) + 1
    qoff = rng_for(cfg.seed, "catalogsim-qoffset").normal(
        0.0, cfg.quadrant_offset_rms_mag, size=n_qid
    )
    zp_true = np.full((len(exps["expid"]), n_qid), np.nan)
    zp0 = _exposure_zp(cfg, instrument, exps)
    for g in camera.quadrants:
        cu = g.x0 + (g.nx - 1) / 2 - camera.axis_x
        cv = g.y0 + (g.ny - 1) / 2 - camera.axis_y
        zp_true[:, g.quadrant] = (
            zp0
            + qoff[g.quadrant]
            - (exps["grad_x"] * cu + exps["grad_y"] * cv) / camera.corner_radius_px
        )
    ncy, ncx = cfg.cells
    starflat_true = np.full((n_qid, ncy, ncx), np.nan)
    for q in qids:
        starflat_true[q] = _cell_means(camera, instrument, cfg.band, int(q), cfg.cells)
    ra0, dec0 = 180.0, 30.0
    exposures = {
        "expid": exps["expid"],
        "night": exps["night"].astype(str),
        "mjd": exps["mjd"],
        "band": np.full(len(exps["expid"]), cfg.band),
        "airmass": exps["airmass"],
        "exptime_s": np.full(len(exps["expid"]), cfg.exptime_s),
        "field": exps["field"],
        "cloud_mag": exps["cloud_mag"],
    }
    star_out = {
        "source_id": stars["source_id"],
        "ra": (ra0 + stars["sx"] / math.cos(math.radians(dec0))) % 360.0,
        "dec": dec0 + stars["sy"],
        "bp_rp": stars["bp_rp"],
        "mag": stars["mag"],
        "ref_mag": stars["ref_mag"],
        "ref_magerr": stars["ref_magerr"],
        "in_refcat": stars["in_refcat"],
        "var_amp_mag": stars["var_amp_mag"],
    }
    order = np.argsort(star_out["source_id"])
    return CatalogSurveyPlan(
        config=cfg,
        exposures=exposures,
        stars={k: v[order] for k, v in star_out.items()},
        zp_true=zp_true,
        starflat_true=starflat_true,
        quadrants=qids,
        camera=camera,
        instrument=instrument,
        sky_stars=stars,
        schedule=exps,
        quadrant_offset=qoff,
    )


# Per-observation truth columns of an exposure catalog (kept out of the observations).
TRUTH_COLUMNS = ("mag_true", "zp_true", "dzp_true", "is_variable", "is_cosmic")


def simulate_catalog_survey(config: CatalogSurveyConfig | None = None) -> CatalogSurvey:
    """Simulate the night catalogs of a tiled, dithered survey, with truth.

    Parameters
    ----------
    config : CatalogSurveyConfig, optional
        The survey; defaults to :class:`CatalogSurveyConfig()`.

    Returns
    -------
    CatalogSurvey
        Observations sorted by (expid, quadrant), exposures, stars and truth;
        the same config gives the same arrays (those of
        :meth:`CatalogSurveyPlan.exposure_catalog`, exposure after exposure).
    """
    plan = plan_catalog_survey(config)
    chunks = [plan.exposure_catalog(e) for e in range(plan.n_exposures)]
    obs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    truth = {k: obs.pop(k) for k in TRUTH_COLUMNS}
    return CatalogSurvey(
        config=plan.config,
        observations=obs,
        exposures=plan.exposures,
        stars=plan.stars,
        zp_true=plan.zp_true,
        starflat_true=plan.starflat_true,
        truth=truth,
        quadrants=plan.quadrants,
    )


def _exposure_zp(cfg: CatalogSurveyConfig, instrument: Instrument, exps: dict) -> np.ndarray:
    """Zero point of each exposure before quadrant offsets and gradients, mag."""
    return (
        instrument.inst.zp_e_per_s[cfg.band]
        - EXTINCTION_PER_AIRMASS[cfg.band] * exps["airmass"]
        - exps["cloud_mag"]
        - exps["telemetry_mag"]
    )


def _observe(plan: CatalogSurveyPlan, e: int) -> dict[str, np.ndarray]:
    """The catalog of exposure row ``e`` (:meth:`CatalogSurveyPlan.exposure_catalog`)."""
    cfg, camera, instrument = plan.config, plan.camera, plan.instrument
    stars, exps = plan.sky_stars, plan.schedule
    scale_deg = cfg.pixel_scale_arcsec / 3600.0
    rng = rng_for(cfg.seed, "catalogsim-exposure", e)
    px, py = exps["px"][e], exps["py"][e]
    half = (camera.mosaic_nx / 2 * scale_deg, camera.mosaic_ny / 2 * scale_deg)
    lo, hi = np.searchsorted(stars["sx"], [px - half[0], px + half[0]])
    idx = np.arange(lo, hi)
    idx = idx[np.abs(stars["sy"][idx] - py) < half[1]]
    mx = camera.axis_x + (stars["sx"][idx] - px) / scale_deg
    my = camera.axis_y + (stars["sy"][idx] - py) / scale_deg
    quad = camera.locate(mx, my)
    keep = quad >= 0
    idx, mx, my, quad = idx[keep], mx[keep], my[keep], quad[keep]
    n_qid = int(camera.quadrant_ids.max()) + 1
    x0 = np.array([camera.by_id[q].x0 if q in camera.by_id else 0 for q in range(n_qid)])
    y0 = np.array([camera.by_id[q].y0 if q in camera.by_id else 0 for q in range(n_qid)])
    x, y = mx - x0[quad], my - y0[quad]
    u, v = mx - camera.axis_x, my - camera.axis_y
    R = camera.corner_radius_px

    zp0 = _exposure_zp(cfg, instrument, {k: exps[k][e] for k in exps})
    gx, gy = exps["grad_x"][e], exps["grad_y"][e]
    zp_star = zp0 + plan.quadrant_offset[quad] - (gx * u + gy * v) / R
    dzp = np.empty(len(idx))
    for q in np.unique(quad):
        sel = quad == q
        dzp[sel] = instrument.starflat_at(int(q), cfg.band, u[sel], v[sel])
    phase = 2 * np.pi * exps["mjd"][e] / stars["var_period_d"][idx] + stars["var_phase"][idx]
    mag_true = stars["mag"][idx] + stars["var_amp_mag"][idx] * np.sin(phase)
    m_inst_true = mag_true - zp_star - dzp
    flux = cfg.exptime_s * 10 ** (-0.4 * m_inst_true)
    # Aperture photometry noise of the pixel simulator: seeing ~2" x X^0.6.
    seeing_px = 2.0 * exps["airmass"][e] ** 0.6 / cfg.pixel_scale_arcsec
    n_pix = math.pi * (1.5 * seeing_px) ** 2
    sky_e = (
        cfg.exptime_s * 10 ** (-0.4 * (SKY_MAG_ARCSEC2[cfg.band] - zp0)) * cfg.pixel_scale_arcsec**2
    )
    rn = instrument.inst.read_noise_e
    flux_err = np.sqrt(flux + n_pix * (sky_e + rn * rn))
    mag_err = _MAG_PER_LN * flux_err / flux
    det = flux / flux_err >= cfg.snr_min
    noise = rng.standard_normal(len(idx)) * np.hypot(mag_err, cfg.noise_floor_mag)
    mag_inst = m_inst_true + noise
    flux_obs = cfg.exptime_s * 10 ** (-0.4 * mag_inst)
    # Peak pixel of a Gaussian PSF: flux / (2 pi sigma^2).
    peak = flux_obs / (2 * math.pi * (seeing_px / 2.3548) ** 2) + sky_e
    flags = np.where(peak > instrument.inst.full_well_e, FLAG_SATURATED, 0)
    order = np.lexsort((stars["source_id"][idx][det], quad[det]))
    cols = {
        "expid": np.full(det.sum(), exps["expid"][e], dtype=np.int64),
        "quadrant": quad[det].astype(np.int64),
        "source_id": stars["source_id"][idx][det],
        "x": x[det],
        "y": y[det],
        "flux": flux_obs[det],
        "flux_err": flux_err[det],
        "mag_inst": mag_inst[det],
        "mag_inst_err": mag_err[det],
        "flags": flags[det].astype(np.int64),
        "mag_true": mag_true[det],
        "zp_true": zp_star[det],
        "dzp_true": dzp[det],
        "is_variable": stars["var_amp_mag"][idx][det] > 0,
    }
    cols = {k: v[order] for k, v in cols.items()}
    # Cosmic-ray hits, drawn per exposure so that any exposure can be drawn alone.
    crng = rng_for(cfg.seed, "catalogsim-cosmics", e)
    hit = crng.uniform(size=len(order)) < cfg.cosmic_fraction
    cols["flux"][hit] += crng.uniform(500.0, 20_000.0, size=int(hit.sum()))
    cols["mag_inst"][hit] = -2.5 * np.log10(cols["flux"][hit] / cfg.exptime_s)
    cols["is_cosmic"] = hit
    return cols


def _cell_means(camera, instrument, band: str, quadrant: int, cells: tuple[int, int]) -> np.ndarray:
    """Mean of the true starflat over each cell, from an 8x8 sub-grid per cell."""
    g = camera.by_id[quadrant]
    ncy, ncx = cells
    sub = 8
    xs = (np.arange(ncx * sub) + 0.5) * g.nx / (ncx * sub) - 0.5
    ys = (np.arange(ncy * sub) + 0.5) * g.ny / (ncy * sub) - 0.5
    uu, vv = np.meshgrid(g.x0 + xs - camera.axis_x, g.y0 + ys - camera.axis_y)
    dzp = instrument.starflat_at(quadrant, band, uu, vv)
    return dzp.reshape(ncy, sub, ncx, sub).mean(axis=(1, 3))
