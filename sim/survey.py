"""A whole simulated survey: schedule, sky, instrument, and the raw files.

``Survey(config)`` is cheap to build and deterministic; every frame and every
truth quantity is computed on demand from it, so frames can be rendered in any
order and in parallel processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.time import Time
from astropy.wcs import WCS

from sim._random import rng_for
from sim.camera import Camera
from sim.catalog import StarCatalog, make_catalog
from sim.config import SceneConfig, SurveyConfig
from sim.fitsio import primary_header, quadrant_hdu, write_exposure, write_refcat
from sim.hosts import (
    AB_NJY_ZERO_POINT,
    GalaxiesOnQuadrant,
    SceneCatalog,
    galaxy_reach_px,
    make_scene,
)
from sim.instrument import Instrument
from sim.render import QuadrantRenderer, StarsOnQuadrant, stamp_half_size
from sim.schedule import Exposure, make_schedule, midnight_transit_ra


@dataclass(frozen=True)
class Observation:
    """Truth for the stars whose centre falls on one quadrant of one exposure."""

    source_index: np.ndarray  # (n,) rows of the StarCatalog
    x: np.ndarray  # (n,) data-section column, 0-based
    y: np.ndarray  # (n,)
    mag: np.ndarray  # (n,) survey-system magnitude at the exposure time
    dzp_starflat: np.ndarray  # (n,) [mag] at the star
    area: np.ndarray  # (n,) relative pixel area at the star


class Survey:
    """Deterministic simulated survey built from a :class:`SurveyConfig`."""

    def __init__(self, config: SurveyConfig) -> None:
        self.config = config
        self.camera = Camera(config.camera)
        self.instrument = Instrument(config, self.camera)
        self.renderer = QuadrantRenderer(self.camera, self.instrument)
        sch = config.schedule
        ra0 = sch.field_ra_deg if sch.field_ra_deg is not None else midnight_transit_ra(config)
        half_x, half_y = self.camera.field_half_size_deg()
        self.exposures: tuple[Exposure, ...] = tuple(
            make_schedule(config, field_ra_deg=ra0, mosaic_half_deg=(half_x, half_y))
        )
        self.by_expid = {e.expid: e for e in self.exposures}
        self.catalog = self._make_catalog(half_x, half_y)
        self.scene = (
            None if config.scene is None else self._make_scene(config.scene, half_x, half_y)
        )

    def _make_catalog(self, half_x: float, half_y: float) -> StarCatalog:
        sci = [e for e in self.exposures if e.imagetyp == "SCIENCE"]
        decs = np.array([e.tel_dec_deg for e in sci])
        ras = np.array([e.tel_ra_deg for e in sci])
        dec_c = 0.5 * (decs.min() + decs.max())
        cosd = math.cos(math.radians(dec_c))
        ra_c = float(np.degrees(np.angle(np.mean(np.exp(1j * np.radians(ras))))))
        dra = np.abs(((ras - ra_c + 180) % 360) - 180) * cosd
        margin = 1.1
        s = self.camera.scale_deg
        return make_catalog(
            self.config,
            center_ra_deg=ra_c % 360.0,
            center_dec_deg=dec_c,
            half_width_deg=(dra.max() + half_x) * margin,
            half_height_deg=(0.5 * (decs.max() - decs.min()) + half_y) * margin,
            quadrant_area_deg2=self.camera.config.quad_nx * self.camera.config.quad_ny * s * s,
        )

    def _make_scene(self, scene: SceneConfig, half_x: float, half_y: float) -> SceneCatalog:
        sci = [e for e in self.exposures if e.imagetyp == "SCIENCE"]
        mjd = [e.mjd for e in sci]
        cat = self.catalog
        ra_c = float(np.degrees(np.angle(np.mean(np.exp(1j * np.radians(cat.ra_deg))))))
        return make_scene(
            scene,
            seed=self.config.seed,
            stars=cat,
            center_ra_deg=ra_c % 360.0,
            center_dec_deg=float(np.mean([e.tel_dec_deg for e in sci])),
            half_size_deg=(half_x, half_y),
            span_mjd=(min(mjd), max(mjd)),
        )

    # -- geometry of an exposure ------------------------------------------------
    def _mosaic_positions(self, exposure: Exposure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Catalog rows near the pointing and their 0-based mosaic (x, y)."""
        cat = self.catalog
        half_x, half_y = self.camera.field_half_size_deg()
        reach = 1.2 * math.hypot(half_x, half_y)
        cosd = math.cos(math.radians(exposure.tel_dec_deg))
        dra = (((cat.ra_deg - exposure.tel_ra_deg) + 180.0) % 360.0 - 180.0) * cosd
        ddec = cat.dec_deg - exposure.tel_dec_deg
        near = np.nonzero((np.abs(dra) < reach) & (np.abs(ddec) < reach))[0]
        wcs = WCS(self.camera.mosaic_wcs_header(exposure.tel_ra_deg, exposure.tel_dec_deg))
        mx, my = wcs.all_world2pix(
            cat.ra_deg[near], cat.dec_deg[near], 0, tolerance=1e-7, maxiter=50
        )
        return near, mx, my

    def quadrant_center_offset(self, quadrant: int) -> tuple[float, float]:
        """Quadrant centre relative to the optical axis, in corner radii."""
        g = self.camera.by_id[quadrant]
        R = self.camera.corner_radius_px
        return (
            (g.x0 + (g.nx - 1) / 2 - self.camera.axis_x) / R,
            (g.y0 + (g.ny - 1) / 2 - self.camera.axis_y) / R,
        )

    def cloud_mag(self, exposure: Exposure, quadrant: int) -> float:
        ox, oy = self.quadrant_center_offset(quadrant)
        gx, gy = exposure.cloud_gradient or (0.0, 0.0)
        return float(max(exposure.cloud_mag + gx * ox + gy * oy, 0.0))

    def zp_true(self, exposure: Exposure, quadrant: int) -> float:
        """True zero point: ``m = m_inst + zp + dzp_starflat`` (docs/simulator.md)."""
        band = exposure.band
        return (
            self.config.instrument.zp_e_per_s[band]
            + 2.5 * math.log10(self.instrument.flat_norm(band))
            - exposure.extinction_mag
            - self.cloud_mag(exposure, quadrant)
            - exposure.telemetry_mag
        )

    def _atmosphere_factor(self, exposure: Exposure, quadrant: int) -> float:
        loss = exposure.extinction_mag + self.cloud_mag(exposure, quadrant) + exposure.telemetry_mag
        return 10 ** (-0.4 * loss)

    def stars_on(self, exposure: Exposure) -> dict[int, StarsOnQuadrant]:
        """Stars whose light reaches each quadrant (including those just off its edge)."""
        near, mx, my = self._mosaic_positions(exposure)
        inst = self.config.instrument
        fwhm = exposure.seeing_arcsec / self.camera.config.pixel_scale_arcsec * 1.05
        h = stamp_half_size(fwhm, inst.psf, inst.moffat_beta)
        mags = self.catalog.mag_at(exposure.band, exposure.mjd, near)
        base_flux = exposure.exptime_s * 10 ** (-0.4 * (mags - inst.zp_e_per_s[exposure.band]))
        out = {}
        for g in self.camera.quadrants:
            x, y = mx - g.x0, my - g.y0
            sel = (x > -h) & (x < g.nx - 1 + h) & (y > -h) & (y < g.ny - 1 + h)
            out[g.quadrant] = StarsOnQuadrant(
                index=near[sel],
                x=x[sel],
                y=y[sel],
                flux_e=base_flux[sel] * self._atmosphere_factor(exposure, g.quadrant),
            )
        return out

    def _scene_pixels(self, exposure: Exposure, ra: np.ndarray, dec: np.ndarray):
        """0-based mosaic (x, y) of sky positions in an exposure."""
        wcs = WCS(self.camera.mosaic_wcs_header(exposure.tel_ra_deg, exposure.tel_dec_deg))
        return wcs.all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50)

    def transients_on(
        self, exposure: Exposure
    ) -> dict[int, tuple[StarsOnQuadrant, GalaxiesOnQuadrant]]:
        """The scene's light reaching each quadrant: transients as point sources
        (``index`` -1 - k for transient k) and host galaxies; empty without a scene."""
        if self.scene is None:
            return {}
        sc, inst = self.scene, self.config.instrument
        band, cam = exposure.band, self.camera
        zp_e = inst.zp_e_per_s[band]
        tx, ty = self._scene_pixels(exposure, sc.ra_deg, sc.dec_deg)
        hx, hy = self._scene_pixels(exposure, sc.host_ra_deg, sc.host_dec_deg)
        t_flux = (
            exposure.exptime_s
            * sc.flux_njy(band, exposure.mjd)
            * 10 ** (-0.4 * (AB_NJY_ZERO_POINT - zp_e))
        )
        h_flux = exposure.exptime_s * 10 ** (-0.4 * (sc.host_mag[band] - zp_e))
        fwhm = exposure.seeing_arcsec / cam.config.pixel_scale_arcsec * 1.05
        psf_half = stamp_half_size(fwhm, inst.psf, inst.moffat_beta)
        r_eff_px = sc.r_eff_arcsec / cam.config.pixel_scale_arcsec
        reach = galaxy_reach_px(r_eff_px, psf_half)
        out = {}
        for g in cam.quadrants:
            atm = self._atmosphere_factor(exposure, g.quadrant)
            x, y = tx - g.x0, ty - g.y0
            on = (
                (t_flux > 0)
                & (x > -psf_half)
                & (x < g.nx - 1 + psf_half)
                & (y > -psf_half)
                & (y < g.ny - 1 + psf_half)
            )
            k = np.flatnonzero(on)
            points = StarsOnQuadrant(index=-1 - k, x=x[k], y=y[k], flux_e=t_flux[k] * atm)
            x, y = hx - g.x0, hy - g.y0
            near = (x > -reach) & (x < g.nx - 1 + reach) & (y > -reach) & (y < g.ny - 1 + reach)
            k = np.flatnonzero(near)
            hosts = GalaxiesOnQuadrant(
                x=x[k],
                y=y[k],
                flux_e=h_flux[k] * atm,
                r_eff_px=r_eff_px[k],
                sersic_n=sc.sersic_n[k],
                axis_ratio=sc.axis_ratio[k],
                pa_deg=sc.pa_deg[k],
                reach_px=reach[k],
            )
            out[g.quadrant] = (points, hosts)
        return out

    def transient_epochs(self, exposure: Exposure) -> dict[str, np.ndarray]:
        """Truth of every transient in one science exposure: its quadrant (-1 in
        a gap or off the mosaic), 0-based data-section position, true magnitude
        and calibrated flux (nJy), the zero point and starflat there, and the
        electrons expected on the fluence image."""
        sc = self.scene
        if sc is None:
            raise ValueError("this survey has no scene (SurveyConfig.scene is None)")
        band = exposure.band
        mx, my = self._scene_pixels(exposure, sc.ra_deg, sc.dec_deg)
        quad = self.camera.locate(mx, my)
        n = len(sc)
        x, y = np.full(n, np.nan), np.full(n, np.nan)
        zp, dzp = np.full(n, np.nan), np.full(n, np.nan)
        for k in np.flatnonzero(quad >= 0):
            g = self.camera.by_id[int(quad[k])]
            x[k], y[k] = mx[k] - g.x0, my[k] - g.y0
            zp[k] = self.zp_true(exposure, g.quadrant)
            dzp[k] = self.instrument.starflat_at(
                g.quadrant,
                band,
                np.array([mx[k] - self.camera.axis_x]),
                np.array([my[k] - self.camera.axis_y]),
            )[0]
        flux_njy = sc.flux_njy(band, exposure.mjd)
        mag = sc.mag_at(band, exposure.mjd)
        return {
            "quadrant": quad.astype(np.int64),
            "x": x,
            "y": y,
            "mag": mag,
            "flux_njy": flux_njy,
            "zp": zp,
            "dzp_starflat": dzp,
            # m = m_inst + zp + dzp: flux_e = EXPTIME 10**(-0.4 (m - zp - dzp)).
            "flux_e": exposure.exptime_s * flux_njy * 10 ** (-0.4 * (AB_NJY_ZERO_POINT - zp - dzp)),
        }

    def observations(self, exposure: Exposure) -> dict[int, Observation]:
        """Truth per quadrant for the stars centred on it (data-section pixels)."""
        near, mx, my = self._mosaic_positions(exposure)
        q_of = self.camera.locate(mx, my)
        mags = self.catalog.mag_at(exposure.band, exposure.mjd, near)
        out = {}
        for g in self.camera.quadrants:
            sel = q_of == g.quadrant
            u, v = mx[sel] - self.camera.axis_x, my[sel] - self.camera.axis_y
            out[g.quadrant] = Observation(
                source_index=near[sel],
                x=mx[sel] - g.x0,
                y=my[sel] - g.y0,
                mag=mags[sel],
                dzp_starflat=self.instrument.starflat_at(g.quadrant, exposure.band, u, v),
                area=self.camera.area_from_offsets(u, v),
            )
        return out

    # -- frames ---------------------------------------------------------------
    def flat_level_e(self, exposure: Exposure) -> float:
        full_well = self.config.instrument.full_well_e
        return (
            0.45
            * full_well
            * rng_for(self.config.seed, "led-level", exposure.expid).uniform(0.8, 1.1)
        )

    def render(self, exposure: Exposure) -> tuple[list, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """Quadrant HDUs of one exposure and the cosmic-ray pixels per quadrant."""
        r = self.renderer
        hdus, cosmics = [], {}
        science = exposure.imagetyp == "SCIENCE"
        stars = self.stars_on(exposure) if science else None
        scene = self.transients_on(exposure) if science else {}
        for g in self.camera.quadrants:
            q = g.quadrant
            if exposure.imagetyp == "BIAS":
                raw = r.bias(q, exposure)
            elif exposure.imagetyp == "DARK":
                raw = r.dark(q, exposure)
            elif exposure.imagetyp == "FLAT":
                raw = r.flat(q, exposure, self.flat_level_e(exposure))
            else:
                on_q, galaxies = stars[q], None
                if q in scene:
                    points, galaxies = scene[q]
                    on_q = StarsOnQuadrant(
                        *(
                            np.concatenate([getattr(on_q, f), getattr(points, f)])
                            for f in ("index", "x", "y", "flux_e")
                        )
                    )
                raw, cosmics[q] = r.science(
                    q,
                    exposure,
                    on_q,
                    cosmics_per_mpix=self.config.camera.cosmics_per_mpix,
                    galaxies=galaxies,
                )
            hdus.append(quadrant_hdu(raw, q, self.camera, self.instrument, exposure))
        return hdus, cosmics

    def raw_relpath(self, exposure: Exposure) -> Path:
        """Where the camera would put the file: by UTC date, as many cameras do
        (which is not the observing night: the pipeline must not rely on it)."""
        utc_day = Time(exposure.mjd, format="mjd", scale="utc").datetime.strftime("%Y%m%d")
        kind = exposure.imagetyp.lower()
        return Path(utc_day) / f"sim_{exposure.expid}_{kind}.fits"

    def write_exposure(
        self, exposure: Exposure, raw_root: Path
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        hdus, cosmics = self.render(exposure)
        primary = primary_header(exposure, self.config.instrument)
        write_exposure(raw_root / self.raw_relpath(exposure), primary, hdus)
        return cosmics

    def write_refcat(self, path: Path) -> int:
        return write_refcat(path, self.catalog)


# -- parallel writing ---------------------------------------------------------
_WORKER_SURVEY: Survey | None = None


def _init_worker(config: SurveyConfig) -> None:
    global _WORKER_SURVEY
    _WORKER_SURVEY = Survey(config)


def _write_one(args: tuple[int, str]) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    expid, raw_root = args
    if _WORKER_SURVEY is None:
        raise RuntimeError("simulation worker was not initialised")
    survey = _WORKER_SURVEY
    return expid, survey.write_exposure(survey.by_expid[expid], Path(raw_root))


def write_raw(
    survey: Survey,
    raw_root: Path,
    *,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Render and write every exposure under ``raw_root``.

    Returns the cosmic-ray pixels per science exposure and quadrant (truth).
    """
    tasks = [(e.expid, str(raw_root)) for e in survey.exposures]
    cosmics: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    if jobs <= 1:
        for expid, _ in tasks:
            cosmics[expid] = survey.write_exposure(survey.by_expid[expid], raw_root)
            if progress:
                progress(expid)
        return cosmics
    with ProcessPoolExecutor(
        max_workers=jobs, initializer=_init_worker, initargs=(survey.config,)
    ) as pool:
        for expid, cr in pool.map(_write_one, tasks):
            cosmics[expid] = cr
            if progress:
                progress(expid)
    return cosmics
