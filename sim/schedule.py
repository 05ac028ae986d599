"""The observing schedule and the atmosphere it meets.

Each night has an afternoon calibration block (biases, darks, dome flats per LED)
and science exposures spread through the dark hours, dithered around the fields
so the same stars fall on different quadrants and superpixel cells. The zero
point of a science exposure is

    zp(exp, q) = ZP_b + 2.5 log10(flat_norm_b) - k_b X - cloud(t, q) - telemetry(T, RH, W)

in the convention ``m = m_inst + zp + dzp_starflat`` with ``m_inst`` measured on
the fluence image made with the true flat normalised to mean 1 over the focal
plane (see docs/simulator.md).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np

from sim._random import rng_for
from sim.config import SurveyConfig

MJD_UNIX_EPOCH = 40587.0
EXTINCTION_PER_AIRMASS = {"g": 0.18, "r": 0.10, "i": 0.05}
SKY_MAG_ARCSEC2 = {"g": 21.6, "r": 20.9, "i": 20.2}


def telemetry_zp_loss_mag(
    temp_c: np.ndarray, rhum_pct: np.ndarray, wind_mps: np.ndarray
) -> np.ndarray:
    """Zero-point loss [mag] driven non-linearly by telemetry (10-30 mmag range):
    a focus/temperature term that saturates, a humidity term that bites near
    saturation, and a wind-shake term that grows sub-linearly."""
    temp_c, rhum_pct, wind_mps = map(np.asarray, (temp_c, rhum_pct, wind_mps))
    return (
        0.015 * np.tanh((temp_c - 12.0) / 4.0)
        + 0.020 * (rhum_pct / 100.0) ** 3
        + 0.006 * np.log1p(wind_mps / 3.0)
    )


def night_start_mjd(night: str, longitude_deg: float, local_hour: float) -> float:
    """UTC MJD of ``local_hour`` (local mean solar time) on the evening ``night``."""
    day = dt.date.fromisoformat(night)
    mjd0 = (day - dt.date(1970, 1, 1)).days + MJD_UNIX_EPOCH
    return mjd0 + local_hour / 24.0 - longitude_deg / 360.0


def airmass(ra_deg: float, dec_deg: float, mjd: float, lat_deg: float, lon_deg: float) -> float:
    """Plane-parallel airmass sec(z) from the mean sidereal time (no IERS needed)."""
    gmst = (280.46061837 + 360.98564736629 * (mjd - 51544.5)) % 360.0
    ha = np.deg2rad(gmst + lon_deg - ra_deg)
    lat, dec = np.deg2rad(lat_deg), np.deg2rad(dec_deg)
    sin_alt = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha)
    if sin_alt < 0.2:
        raise ValueError(f"field below 11.5 deg altitude at MJD {mjd:.4f}")
    return float(1.0 / sin_alt)


@dataclass(frozen=True)
class Exposure:
    """One simulated exposure and the conditions it was taken in."""

    expid: int
    night: str
    night_index: int
    mjd: float
    imagetyp: str
    exptime_s: float
    band: str | None = None
    led_id: int | None = None
    led_index: int | None = None
    tel_ra_deg: float | None = None
    tel_dec_deg: float | None = None
    airmass: float | None = None
    out_temp_c: float | None = None
    out_rhum_pct: float | None = None
    wind_mps: float | None = None
    seeing_arcsec: float | None = None
    sky_mag_arcsec2: float | None = None
    extinction_mag: float | None = None
    """k_b x airmass."""
    cloud_mag: float | None = None
    """Grey cloud extinction at the optical axis."""
    cloud_gradient: tuple[float, float] | None = None
    """Cloud extinction change [mag] per corner radius along mosaic x and y."""
    telemetry_mag: float | None = None


def cloud_curve(rng: np.random.Generator, hours: np.ndarray) -> np.ndarray:
    base = rng.uniform(0.05, 0.3)
    wave = np.zeros_like(hours)
    for _ in range(4):
        period = rng.uniform(0.3, 3.0)
        wave += np.sin(2 * np.pi * hours / period + rng.uniform(0, 2 * np.pi))
    return np.clip(base * (1.0 + 0.3 * wave), 0.0, None)


def make_schedule(
    config: SurveyConfig, *, field_ra_deg: float, mosaic_half_deg: tuple[float, float]
) -> list[Exposure]:
    """Every exposure of the survey, in time order."""
    sch, cam = config.schedule, config.camera
    inst = config.instrument
    out: list[Exposure] = []
    first = dt.date.fromisoformat(sch.first_night)
    for n in range(sch.n_nights):
        night = (first + dt.timedelta(days=n)).isoformat()
        rng = rng_for(config.seed, "night", n)
        seq = iter(range(1, 10_000))

        def expid(seq=seq, n=n) -> int:
            return 100_000_000 + 10_000 * (n + 1) + next(seq)

        # Afternoon calibrations, from 16:00 local, one frame every 40 s.
        t = night_start_mjd(night, cam.site_longitude_deg, 16.0)
        step = 40.0 / 86400.0
        for _ in range(sch.n_bias):
            out.append(Exposure(expid(), night, n, t, "BIAS", 0.0))
            t += step
        for _ in range(sch.n_dark):
            out.append(Exposure(expid(), night, n, t, "DARK", 30.0))
            t += step + 30.0 / 86400.0
        for b_i, band in enumerate(sch.bands):
            for led in range(sch.leds_per_band):
                led_id = 10 * (b_i + 1) + led + 1
                for _ in range(sch.n_flat_per_led):
                    out.append(
                        Exposure(
                            expid(),
                            night,
                            n,
                            t,
                            "FLAT",
                            3.0,
                            band=band,
                            led_id=led_id,
                            led_index=led,
                        )
                    )
                    t += step
        out.extend(
            _science_night(config, n, night, rng, expid, field_ra_deg, mosaic_half_deg, inst)
        )
    return out


def _science_night(
    config, n, night, rng, expid, field_ra_deg, mosaic_half_deg, inst
) -> list[Exposure]:
    sch, cam = config.schedule, config.camera
    cloudy = n == 1 or (n > 1 and rng.uniform() < sch.cloudy_fraction)
    t0 = night_start_mjd(night, cam.site_longitude_deg, 20.0)
    span_h = 8.0
    slots = (
        np.sort(rng.uniform(0.0, span_h, size=sch.n_science))
        if sch.n_science > 1
        else np.array([span_h / 2])
    )
    hours = slots
    clouds = cloud_curve(rng, hours) if cloudy else np.zeros_like(hours)
    temp0 = rng.uniform(4.0, 20.0)
    rh0 = rng.uniform(15.0, 70.0)
    half_x, half_y = mosaic_half_deg
    fields = _field_centres(config, field_ra_deg, half_x, half_y)
    exposures = []
    for k, h in enumerate(hours):
        mjd = t0 + h / 24.0
        band = sch.bands[k % len(sch.bands)]
        f_ra, f_dec = fields[k % len(fields)]
        dx = rng.uniform(-1, 1) * sch.dither_fraction * 2 * half_x
        dy = rng.uniform(-1, 1) * sch.dither_fraction * 2 * half_y
        ra = f_ra + dx / math.cos(math.radians(f_dec))
        dec = f_dec + dy
        x_air = airmass(ra, dec, mjd, cam.site_latitude_deg, cam.site_longitude_deg)
        temp = temp0 - 0.6 * h + rng.normal(0, 0.3)
        rhum = float(np.clip(rh0 + 4.0 * h + rng.normal(0, 3.0), 5.0, 99.0))
        wind = float(rng.gamma(2.0, 2.5))
        seeing = inst.seeing_median_arcsec * math.exp(rng.normal(0, 0.15)) * x_air**0.6
        grad = tuple(rng.normal(0.0, 0.015, size=2)) if cloudy else (0.0, 0.0)
        exposures.append(
            Exposure(
                expid=expid(),
                night=night,
                night_index=n,
                mjd=mjd,
                imagetyp="SCIENCE",
                exptime_s=sch.exptime_s,
                band=band,
                tel_ra_deg=ra % 360.0,
                tel_dec_deg=dec,
                airmass=x_air,
                out_temp_c=float(temp),
                out_rhum_pct=rhum,
                wind_mps=wind,
                seeing_arcsec=float(seeing),
                sky_mag_arcsec2=float(SKY_MAG_ARCSEC2[band] + rng.normal(0, 0.3)),
                extinction_mag=EXTINCTION_PER_AIRMASS[band] * x_air,
                cloud_mag=float(clouds[k]),
                cloud_gradient=(float(grad[0]), float(grad[1])),
                telemetry_mag=float(telemetry_zp_loss_mag(temp, rhum, wind)),
            )
        )
    return exposures


def _field_centres(
    config: SurveyConfig, ra0: float, half_x: float, half_y: float
) -> list[tuple[float, float]]:
    sch = config.schedule
    dec0 = sch.field_dec_deg
    centres = []
    for f in range(sch.n_fields):
        # Fields overlap by half a focal plane along RA so the graph stays connected.
        off = (f - (sch.n_fields - 1) / 2) * half_x
        centres.append((ra0 + off / math.cos(math.radians(dec0)), dec0))
    return centres


def midnight_transit_ra(config: SurveyConfig) -> float:
    """RA that transits at local midnight in the middle of the run."""
    sch, cam = config.schedule, config.camera
    mid = dt.date.fromisoformat(sch.first_night) + dt.timedelta(days=sch.n_nights // 2)
    mjd = night_start_mjd(mid.isoformat(), cam.site_longitude_deg, 24.0)
    gmst = (280.46061837 + 360.98564736629 * (mjd - 51544.5)) % 360.0
    return (gmst + cam.site_longitude_deg) % 360.0
