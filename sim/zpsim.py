"""The simulator's feature mode for the zero-point network: thousands of
exposures over many nights and several survey domains, rendering only what the
network reads (an image patch, the star list, the telemetry) and the true
zero-point offset. No FITS, no focal plane: seconds for a training set.

The atmosphere is the pixel simulator's (sim/schedule.py): extinction
``k_b X``, grey clouds varying through a cloudy night, and the non-linear
telemetry loss, here scaled and shifted per domain (a different site and
instrument respond differently to the same weather). The zero point is

    zp = zp_nominal(band) + offset,   offset = -k_b X - cloud(t) - loss(T, RH, W)

and a star at position ``u`` in the quadrant also sees the cloud gradient
``g . u`` (zero mean over the quadrant). Star lists have the detection limit,
photon and read noise, a noise floor, variables and cosmic-ray outliers; fields
range from crowded to nearly empty, and thick clouds empty them further.

The dark sky scatters by 0.3 mag from exposure to exposure (moon, airglow,
pointing), as in the pixel simulator (sim/schedule.py), and clouds brighten it
by ``1 + 1.5 cloud``: the sky level says that a night is cloudy, not by how
many millimagnitudes.

The patch stands for a 256x256-pixel cut of the quadrant's centre block-averaged
to ``patch_px`` (what ml/zp_features.patch_image makes of a pipeline patch).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np

from sim._random import rng_for
from sim.schedule import (
    EXTINCTION_PER_AIRMASS,
    MJD_UNIX_EPOCH,
    SKY_MAG_ARCSEC2,
    cloud_curve,
    telemetry_zp_loss_mag,
)

NATIVE_PATCH_PX = 256
QUADRANT_PX = 3072
SKY_SCATTER_MAG = 0.3
"""Exposure-to-exposure scatter of the dark sky (sim/schedule.py draws the same)."""
DUSK_HOUR = 19.0
"""Local hour of a night's first possible exposure (mjd only; nothing depends on it)."""


@dataclass(frozen=True, kw_only=True)
class ZPDomain:
    """One simulated survey: site climate, instrument and how they meet.

    Attributes
    ----------
    name : str
    index : int
        Domain label for the discriminator.
    zp_nominal_mag : dict of str to float, mag
        Clear-sky, zero-airmass zero point per band (1 e-/s).
    extinction_scale : float
        Site extinction over the pixel simulator's ``k_b``.
    telemetry_scale : float
        Scale of the telemetry-driven loss.
    temp_shift_c : float
        The loss's temperature pivot moves by this much (another telescope's
        focus behaves differently).
    dusk_temp_c, dusk_rhum_pct : (float, float)
        Ranges of the evening temperature and humidity.
    wind_mean_mps : float
    cloudy_fraction : float
        Probability that a night is cloudy.
    stars_range : (float, float)
        Log-uniform range of the number of stars brighter than mag 21 on a
        quadrant (sparse to crowded fields).
    seeing_arcsec : float
        Median seeing at zenith.
    pixel_scale_arcsec : float
    read_noise_e : float
    exptime_s : float
    noise_floor_mag : float
        Per-star systematic scatter.
    first_night : str
    """

    name: str
    index: int
    zp_nominal_mag: dict[str, float]
    extinction_scale: float = 1.0
    telemetry_scale: float = 1.0
    temp_shift_c: float = 0.0
    dusk_temp_c: tuple[float, float] = (4.0, 20.0)
    dusk_rhum_pct: tuple[float, float] = (15.0, 70.0)
    wind_mean_mps: float = 5.0
    cloudy_fraction: float = 0.35
    stars_range: tuple[float, float] = (15.0, 3000.0)
    seeing_arcsec: float = 2.0
    pixel_scale_arcsec: float = 1.0
    read_noise_e: float = 8.0
    exptime_s: float = 30.0
    noise_floor_mag: float = 0.005
    first_night: str = "2025-01-05"


DOMAINS: dict[str, ZPDomain] = {
    "A": ZPDomain(name="A", index=0, zp_nominal_mag={"g": 24.8, "r": 24.6, "i": 24.2}),
    "B": ZPDomain(
        name="B",
        index=1,
        zp_nominal_mag={"g": 24.3, "r": 24.2, "i": 23.9},
        extinction_scale=1.25,
        telemetry_scale=1.4,
        temp_shift_c=-4.0,
        dusk_temp_c=(-2.0, 12.0),
        dusk_rhum_pct=(30.0, 85.0),
        wind_mean_mps=7.0,
        cloudy_fraction=0.45,
        seeing_arcsec=1.5,
        pixel_scale_arcsec=0.7,
        read_noise_e=4.5,
        first_night="2025-02-11",
    ),
    "C": ZPDomain(
        name="C",
        index=2,
        zp_nominal_mag={"g": 25.1, "r": 24.9, "i": 24.6},
        extinction_scale=0.8,
        telemetry_scale=0.8,
        temp_shift_c=3.0,
        dusk_temp_c=(8.0, 26.0),
        dusk_rhum_pct=(5.0, 45.0),
        wind_mean_mps=4.0,
        cloudy_fraction=0.25,
        stars_range=(8.0, 1500.0),
        seeing_arcsec=1.1,
        pixel_scale_arcsec=0.5,
        read_noise_e=6.0,
        first_night="2025-03-20",
    ),
}


@dataclass(frozen=True)
class ZPExposure:
    """What the feature code gets from one simulated exposure, plus its truth.

    ``image_e_s`` is the patch (patch_px, patch_px) in e-/s per native pixel;
    star arrays are the detected stars, ``x`` and ``y`` their position in the
    quadrant (-1..1 from its centre, ``radius`` the distance over the
    half-diagonal); ``offset_mag`` and ``cloud_mag`` are true.
    """

    domain: int
    night: str
    expid: int
    mjd: float
    band: str
    airmass: float
    out_temp_c: float
    out_rhum_pct: float
    wind_mps: float
    image_e_s: np.ndarray
    mag_ref: np.ndarray
    colour: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    mag_inst: np.ndarray
    mag_inst_err: np.ndarray
    offset_mag: float
    cloud_mag: float
    zp_nominal_mag: float


def simulate_zp_exposures(
    domain: ZPDomain,
    *,
    n_nights: int,
    exposures_per_night: int,
    patch_px: int = 32,
    seed: int = 0,
) -> list[ZPExposure]:
    """Every exposure of ``n_nights`` nights of one domain, in time order.

    Deterministic in ``(seed, domain.name, night)``: a night comes out the same
    whatever else is simulated.
    """
    if n_nights < 1 or exposures_per_night < 1:
        raise ValueError("n_nights and exposures_per_night must be >= 1")
    if patch_px < 8 or NATIVE_PATCH_PX % patch_px:
        raise ValueError(f"patch_px must divide {NATIVE_PATCH_PX} and be >= 8, got {patch_px}")
    first = dt.date.fromisoformat(domain.first_night)
    out: list[ZPExposure] = []
    for n in range(n_nights):
        night = (first + dt.timedelta(days=n)).isoformat()
        rng = rng_for(seed, "zpsim", domain.name, night)
        out += _night(domain, night, n, exposures_per_night, patch_px, rng)
    return out


def _night(domain, night, n, n_exp, patch_px, rng) -> list[ZPExposure]:
    mjd0 = (dt.date.fromisoformat(night) - dt.date(1970, 1, 1)).days + MJD_UNIX_EPOCH
    hours = np.sort(rng.uniform(0.0, 8.0, size=n_exp))
    cloudy = rng.uniform() < domain.cloudy_fraction
    clouds = cloud_curve(rng, hours) * rng.uniform(0.3, 2.5) if cloudy else np.zeros(n_exp)
    temp0 = rng.uniform(*domain.dusk_temp_c)
    rh0 = rng.uniform(*domain.dusk_rhum_pct)
    out = []
    for k, h in enumerate(hours):
        band = ("g", "r", "i")[rng.integers(3)]
        x_air = float(1.0 + np.abs(rng.normal(0.0, 0.35)))
        temp = float(temp0 - 0.6 * h + rng.normal(0, 0.3))
        rhum = float(np.clip(rh0 + 4.0 * h + rng.normal(0, 3.0), 3.0, 99.0))
        wind = float(rng.gamma(2.0, domain.wind_mean_mps / 2.0))
        loss = domain.telemetry_scale * float(
            telemetry_zp_loss_mag(temp - domain.temp_shift_c, rhum, wind)
        )
        extinction = domain.extinction_scale * EXTINCTION_PER_AIRMASS[band] * x_air
        offset = -extinction - float(clouds[k]) - loss
        seeing = domain.seeing_arcsec * math.exp(rng.normal(0, 0.15)) * x_air**0.6
        gradient = rng.normal(0.0, 0.015, size=2) if cloudy else np.zeros(2)
        sky_scatter = rng.normal(0.0, SKY_SCATTER_MAG)
        sky = _sky_e_s_per_px(domain, band, offset, float(clouds[k]), sky_scatter)
        stars = _stars(domain, band, offset, sky, seeing, gradient, rng)
        image = _patch(domain, band, offset, sky, seeing, patch_px, rng)
        out.append(
            ZPExposure(
                domain=domain.index,
                night=night,
                expid=(domain.index + 1) * 10**8 + (n + 1) * 10**4 + k + 1,
                mjd=float(mjd0 + (DUSK_HOUR + h) / 24.0),
                band=band,
                airmass=x_air,
                out_temp_c=temp,
                out_rhum_pct=rhum,
                wind_mps=wind,
                image_e_s=image,
                offset_mag=offset,
                cloud_mag=float(clouds[k]),
                zp_nominal_mag=domain.zp_nominal_mag[band],
                **stars,
            )
        )
    return out


def _sky_e_s_per_px(domain, band, offset, cloud, scatter_mag) -> float:
    """Sky per native pixel; clouds scatter moon- and city-light back (brighter)."""
    mag = SKY_MAG_ARCSEC2[band] + scatter_mag - 2.5 * math.log10(1.0 + 1.5 * cloud)
    zp = domain.zp_nominal_mag[band] + offset + cloud  # the sky light is not behind the cloud
    return 10.0 ** (-0.4 * (mag - zp)) * domain.pixel_scale_arcsec**2


def _stars(domain, band, offset, sky_e_s, seeing, gradient, rng) -> dict[str, np.ndarray]:
    n_all = rng.poisson(math.exp(rng.uniform(*np.log(domain.stars_range))) * 2.0)
    # N(<m) grows as 10^(0.3 m); half the stars above mag 21 sit in 21..22.
    u = rng.uniform(size=n_all)
    lo, hi = 10.0 ** (0.3 * 14.0), 10.0 ** (0.3 * 22.0)
    mag = np.log10(lo + u * (hi - lo)) / 0.3
    colour = np.clip(rng.normal(1.0, 0.5, size=n_all), -0.5, 3.5)
    xy = rng.uniform(-1.0, 1.0, size=(n_all, 2))
    local = offset - xy @ gradient
    zp = domain.zp_nominal_mag[band] + local
    t = domain.exptime_s
    flux_e = t * 10.0 ** (-0.4 * (mag - zp))
    fwhm_px = seeing / domain.pixel_scale_arcsec
    area = math.pi * (1.5 * fwhm_px) ** 2
    sky_e = sky_e_s * t
    var = flux_e + area * (sky_e + domain.read_noise_e**2)
    err = 1.0857 * np.sqrt(var) / flux_e
    keep = (flux_e / np.sqrt(var) > 5.0) & (flux_e < 3e5)  # S/N cut, saturation
    mag, colour, xy, zp, err = mag[keep], colour[keep], xy[keep], zp[keep], err[keep]
    scatter = np.hypot(err, domain.noise_floor_mag)
    mag_inst = mag - zp + rng.normal(0.0, 1.0, size=len(mag)) * scatter
    variable = rng.uniform(size=len(mag)) < 0.03
    mag_inst[variable] += rng.choice([-1, 1], variable.sum()) * rng.uniform(
        0.05, 0.5, variable.sum()
    )
    cosmic = rng.uniform(size=len(mag)) < 0.01
    mag_inst[cosmic] -= rng.uniform(0.05, 1.0, cosmic.sum())
    return {
        "mag_ref": mag,
        "colour": colour,
        "x": xy[:, 0],
        "y": xy[:, 1],
        "radius": np.hypot(xy[:, 0], xy[:, 1]) / math.sqrt(2.0),
        "mag_inst": mag_inst,
        "mag_inst_err": err,
    }


def _patch(domain, band, offset, sky, seeing, patch_px, rng) -> np.ndarray:
    """The quadrant's central 256x256 pixels block-averaged to ``patch_px``, in
    e-/s per native pixel, with photon and read noise."""
    f = NATIVE_PATCH_PX // patch_px
    t = domain.exptime_s
    density = math.exp(rng.uniform(*np.log(domain.stars_range))) * 4.0
    n = rng.poisson(density * (NATIVE_PATCH_PX / QUADRANT_PX) ** 2)
    u = rng.uniform(size=n)
    lo, hi = 10.0 ** (0.3 * 14.0), 10.0 ** (0.3 * 23.0)
    mag = np.log10(lo + u * (hi - lo)) / 0.3
    flux = 10.0 ** (-0.4 * (mag - domain.zp_nominal_mag[band] - offset))  # e-/s
    pos = rng.uniform(0.0, patch_px, size=(n, 2))
    sigma = max(0.5, seeing / domain.pixel_scale_arcsec / 2.355 / f)
    grid = np.arange(patch_px) + 0.5
    gy = np.exp(-0.5 * ((grid[None, :] - pos[:, :1]) / sigma) ** 2)
    gx = np.exp(-0.5 * ((grid[None, :] - pos[:, 1:]) / sigma) ** 2)
    norm = gy.sum(1) * gx.sum(1) + 1e-30
    stars = np.einsum("n,ny,nx->yx", flux / norm, gy, gx)  # e-/s per binned pixel
    mean = sky + stars / f**2  # per native pixel
    var_e = np.maximum(mean * t, 0.0) * f**2 + f**2 * domain.read_noise_e**2  # summed over f^2
    noisy = mean + rng.normal(0.0, 1.0, size=mean.shape) * np.sqrt(var_e) / (t * f**2)
    return noisy.astype(np.float32)
