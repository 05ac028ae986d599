"""Render raw readout-quadrant frames: light in electrons, photon noise, full-well
saturation with bleeding, cosmic rays, read noise, gain, bias structure and
overscan, 16-bit quantisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim._random import rng_for
from sim.camera import Camera
from sim.hosts import GalaxiesOnQuadrant, add_galaxies
from sim.instrument import Instrument
from sim.schedule import Exposure

DARK_CURRENT_E_PER_S = 0.02


@dataclass(frozen=True)
class StarsOnQuadrant:
    """The stars falling on one quadrant of one exposure (data-section pixels)."""

    index: np.ndarray  # (n,) rows of the StarCatalog
    x: np.ndarray  # (n,) 0-based data-section column
    y: np.ndarray  # (n,)
    flux_e: np.ndarray  # (n,) electrons collected (before QE/vignetting/starflat)


def psf_stamps(
    dx: np.ndarray,
    dy: np.ndarray,
    jac: np.ndarray,
    *,
    fwhm_px: float | np.ndarray,
    kind: str,
    beta: float,
) -> np.ndarray:
    """Normalised PSF stamps (n, s, s) at pixel offsets from each star's centre.

    ``jac`` (n, 2, 2) maps pixel offsets to nominal-pixel offsets on the sky, so
    the PSF, round on the sky, is stretched by the distortion on the detector.
    Each stamp is renormalised to sum to 1, which conserves the star's fluence
    exactly whatever the sampling.
    """
    # (n, s, s) offsets on the sky in nominal pixels
    su = jac[:, 0, 0, None, None] * dx + jac[:, 0, 1, None, None] * dy
    sv = jac[:, 1, 0, None, None] * dx + jac[:, 1, 1, None, None] * dy
    r2 = su * su + sv * sv
    fwhm = np.asarray(fwhm_px, dtype=np.float64).reshape(-1, 1, 1)
    if kind == "gaussian":
        sigma2 = (fwhm / 2.3548200450309493) ** 2
        prof = np.exp(-0.5 * r2 / sigma2)
    else:
        alpha2 = (fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))) ** 2
        prof = (1.0 + r2 / alpha2) ** (-beta)
    return prof / prof.sum(axis=(1, 2), keepdims=True)


def stamp_half_size(fwhm_px: float, kind: str, beta: float) -> int:
    if kind == "gaussian":
        return int(np.ceil(2.5 * fwhm_px)) + 1
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    # Moffat wings: radius enclosing all but ~1e-4 of the light.
    return int(np.ceil(alpha * np.sqrt(1e-4 ** (1.0 / (1.0 - beta)) - 1.0))) + 1


def add_stars(
    image: np.ndarray,
    stars: StarsOnQuadrant,
    jac: np.ndarray,
    *,
    fwhm_px: np.ndarray,
    kind: str,
    beta: float,
    batch: int = 2048,
) -> None:
    """Add star light (electrons, before per-pixel response) into ``image`` in place."""
    if len(stars.x) == 0:
        return
    ny, nx = image.shape
    h = stamp_half_size(float(np.max(fwhm_px)), kind, beta)
    offs = np.arange(-h, h + 1)
    flat = image.reshape(-1)
    for start in range(0, len(stars.x), batch):
        sl = slice(start, start + batch)
        x, y = stars.x[sl], stars.y[sl]
        ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        px = ix[:, None, None] + offs[None, None, :]  # (n, 1, s)
        py = iy[:, None, None] + offs[None, :, None]  # (n, s, 1)
        stamps = psf_stamps(
            px - x[:, None, None],
            py - y[:, None, None],
            jac[sl],
            fwhm_px=fwhm_px[sl],
            kind=kind,
            beta=beta,
        )
        stamps *= stars.flux_e[sl, None, None]
        px_b, py_b = np.broadcast_arrays(px, py)
        inside = (px_b >= 0) & (px_b < nx) & (py_b >= 0) & (py_b < ny)
        idx = (py_b * nx + px_b)[inside]
        flat += np.bincount(idx, weights=stamps[inside], minlength=flat.size)


GALAXY_GRID_STEP_PX = 0.25
"""Sampling of host-galaxy profiles on the sky before the PSF (sim/hosts.py)."""


def fine_psf(fwhm_px: float, step_px: float, *, kind: str, beta: float) -> np.ndarray:
    """The PSF, round on the sky, on a grid of ``step_px`` nominal pixels, sum 1."""
    h = int(np.ceil(stamp_half_size(fwhm_px, kind, beta) / step_px))
    offs = np.arange(-h, h + 1) * step_px
    return psf_stamps(
        offs[None, None, :],
        offs[None, :, None],
        np.eye(2)[None],
        fwhm_px=fwhm_px,
        kind=kind,
        beta=beta,
    )[0]


def bleed(electrons: np.ndarray, full_well: float) -> None:
    """Spill charge above full well along columns, up and down, in place."""
    over = electrons > full_well
    if not over.any():
        return
    ny = electrons.shape[0]
    for col in np.unique(np.nonzero(over)[1]):
        c = electrons[:, col]
        excess = float(np.clip(c - full_well, 0, None).sum())
        np.minimum(c, full_well, out=c)
        rows = np.nonzero(c >= full_well)[0]
        lo, hi = int(rows.min()), int(rows.max())
        while excess > 0 and (lo > 0 or hi < ny - 1):
            for r in (lo - 1, hi + 1):
                if 0 <= r < ny and excess > 0:
                    room = full_well - c[r]
                    take = min(room, excess / 2 if lo > 0 and hi < ny - 1 else excess)
                    c[r] += take
                    excess -= take
            lo, hi = max(lo - 1, 0), min(hi + 1, ny - 1)


def cosmic_rays(
    rng: np.random.Generator, shape: tuple[int, int], mean_hits: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosmic-ray hits: short straight tracks. Returns (y, x, electrons) per pixel hit."""
    ny, nx = shape
    ys, xs, es = [], [], []
    for _ in range(rng.poisson(mean_hits)):
        y0, x0 = rng.uniform(0, ny), rng.uniform(0, nx)
        length = rng.exponential(3.0)
        angle = rng.uniform(0, np.pi)
        n = max(1, int(np.ceil(length)) + 1)
        t = np.linspace(0.0, length, n)
        yy = np.clip(np.rint(y0 + t * np.sin(angle)), 0, ny - 1).astype(np.int64)
        xx = np.clip(np.rint(x0 + t * np.cos(angle)), 0, nx - 1).astype(np.int64)
        deposit = rng.uniform(800.0, 15000.0) * rng.uniform(0.6, 1.0, size=n)
        ys.append(yy)
        xs.append(xx)
        es.append(deposit)
    if not ys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(es)


class QuadrantRenderer:
    """Turns the light that reaches one quadrant into a raw 16-bit frame."""

    def __init__(self, camera: Camera, instrument: Instrument) -> None:
        self.camera = camera
        self.instrument = instrument
        self.seed = instrument.seed

    def to_raw(
        self, electrons: np.ndarray, quadrant: int, exposure: Exposure, rng: np.random.Generator
    ) -> np.ndarray:
        """Electrons (ny, nx) -> uint16 raw array (ny, nx + n_overscan)."""
        g = self.camera.by_id[quadrant]
        elec = self.instrument.electronics(quadrant)
        level = self.instrument.bias_level(quadrant, exposure.night_index, exposure.expid)
        row_noise = rng.normal(0.0, 0.3, size=(g.ny, 1))
        rn_adu = elec.read_noise_e / elec.gain_e_per_adu
        data = electrons / elec.gain_e_per_adu
        data += rng.normal(0.0, rn_adu, size=data.shape)
        data += self.instrument.bias_pattern(quadrant, exposure.night_index)
        data += level + row_noise
        overscan = level + row_noise + rng.normal(0.0, rn_adu, size=(g.ny, g.n_overscan))
        raw = np.empty((g.ny, g.nx + g.n_overscan))
        raw[:, g.data_slice] = data
        raw[:, g.overscan_slice] = overscan
        return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)

    def psf_at(
        self, quadrant: int, exposure: Exposure, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distortion Jacobian (n, 2, 2) and PSF FWHM (n,) [px] at data-section
        positions of a quadrant in an exposure."""
        cam = self.camera
        g = cam.by_id[quadrant]
        su = g.x0 + np.asarray(x) - cam.axis_x
        sv = g.y0 + np.asarray(y) - cam.axis_y
        fwhm = exposure.seeing_arcsec / cam.config.pixel_scale_arcsec
        # The PSF broadens slightly towards the edge of the field.
        return cam.distortion_jacobian(su, sv), fwhm * (
            1.0 + 0.05 * (su * su + sv * sv) / cam.corner_radius_px**2
        )

    def bias(self, quadrant: int, exposure: Exposure) -> np.ndarray:
        rng = rng_for(self.seed, "frame", exposure.expid, quadrant)
        g = self.camera.by_id[quadrant]
        return self.to_raw(np.zeros((g.ny, g.nx)), quadrant, exposure, rng)

    def dark(self, quadrant: int, exposure: Exposure) -> np.ndarray:
        rng = rng_for(self.seed, "frame", exposure.expid, quadrant)
        g = self.camera.by_id[quadrant]
        lam = np.full((g.ny, g.nx), DARK_CURRENT_E_PER_S * exposure.exptime_s)
        return self.to_raw(rng.poisson(lam).astype(np.float64), quadrant, exposure, rng)

    def flat(self, quadrant: int, exposure: Exposure, level_e: float) -> np.ndarray:
        rng = rng_for(self.seed, "frame", exposure.expid, quadrant)
        band = exposure.band
        if band is None or exposure.led_index is None:
            raise ValueError(f"exposure {exposure.expid} is not a dome flat (no band or LED)")
        a_led = self.instrument.led_coefficients(band)[exposure.led_index]
        resp = self.instrument.flat_response(quadrant, band)
        resp *= 1.0 + a_led * self.instrument.chroma(quadrant)
        elec = rng.poisson(level_e * resp).astype(np.float64)
        bleed(elec, self.instrument.electronics(quadrant).full_well_e)
        return self.to_raw(elec, quadrant, exposure, rng)

    def science(
        self,
        quadrant: int,
        exposure: Exposure,
        stars: StarsOnQuadrant,
        *,
        cosmics_per_mpix: float,
        galaxies: GalaxiesOnQuadrant | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Raw science frame and the (y, x) pixels hit by cosmic rays; ``galaxies``
        adds host galaxies (sim/hosts.py) to the stars' light."""
        if exposure.band is None or exposure.seeing_arcsec is None:
            raise ValueError(f"exposure {exposure.expid} is not a science frame")
        rng = rng_for(self.seed, "frame", exposure.expid, quadrant)
        inst, cam = self.instrument, self.camera
        g = cam.by_id[quadrant]
        band = exposure.band
        u, v = cam.offsets(quadrant)
        area = cam.area_from_offsets(u, v)
        common = inst.common_response(quadrant, band)
        s_flat = 10 ** (0.4 * inst.starflat_at(quadrant, band, u, v))
        inst_cfg = inst.inst
        sky_rate = 10 ** (-0.4 * (exposure.sky_mag_arcsec2 - inst_cfg.zp_e_per_s[band]))
        sky_rate *= cam.config.pixel_scale_arcsec**2
        light = np.zeros((g.ny, g.nx))
        jac, fwhm_star = self.psf_at(quadrant, exposure, stars.x, stars.y)
        add_stars(
            light, stars, jac, fwhm_px=fwhm_star, kind=inst_cfg.psf, beta=inst_cfg.moffat_beta
        )
        if galaxies is not None and len(galaxies.x):
            gjac, gfwhm = self.psf_at(quadrant, exposure, galaxies.x, galaxies.y)
            step = GALAXY_GRID_STEP_PX
            psfs = [fine_psf(f, step, kind=inst_cfg.psf, beta=inst_cfg.moffat_beta) for f in gfwhm]
            add_galaxies(light, galaxies, gjac, psf=psfs, psf_step_px=step)
        light += sky_rate * exposure.exptime_s * area
        light *= common * s_flat
        light += DARK_CURRENT_E_PER_S * exposure.exptime_s
        elec = rng.poisson(light).astype(np.float64)
        full_well = inst.electronics(quadrant).full_well_e
        bleed(elec, full_well)
        area_mpix = g.nx * g.ny / 1e6
        cy, cx, ce = cosmic_rays(
            rng, (g.ny, g.nx), cosmics_per_mpix * area_mpix * exposure.exptime_s / 30.0
        )
        np.add.at(elec, (cy, cx), ce)
        np.minimum(elec, full_well, out=elec)
        return self.to_raw(elec, quadrant, exposure, rng), (cy, cx)
