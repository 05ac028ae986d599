"""Configuration of a simulated survey: camera, instrument domain, schedule.

Everything the simulator draws is a deterministic function of ``SurveyConfig``
(including its ``seed``), so two runs with the same configuration write the same
bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Band = Literal["g", "r", "i"]
BANDS: tuple[Band, ...] = ("g", "r", "i")


@dataclass(frozen=True)
class CameraConfig:
    """Focal-plane geometry.

    CCDs are taken from the 4x4 ZTF-like mosaic, ``CCD_ID = 1 + col + 4 * row``
    (row 0 at the bottom); each CCD holds 2x2 readout quadrants (Q1 top right,
    Q2 top left, Q3 bottom left, Q4 bottom right). The optical axis sits at the
    centre of the selected CCDs.
    """

    ccd_cols: tuple[int, ...] = (0, 1, 2, 3)
    """Mosaic columns (0..3) of the CCDs that exist in this camera."""
    ccd_rows: tuple[int, ...] = (0, 1, 2, 3)
    """Mosaic rows (0..3) of the CCDs that exist in this camera."""
    quad_nx: int = 3072
    """Data columns per quadrant."""
    quad_ny: int = 3080
    """Data rows per quadrant."""
    n_overscan: int = 30
    """Overscan columns per quadrant, on the readout side."""
    ccd_gap_px: int = 60
    """Gap between neighbouring CCDs in pixels."""
    pixel_scale_arcsec: float = 1.0
    """Nominal pixel scale at the optical axis."""
    area_excess_at_corner: float = 0.03
    """Relative pixel-area excess from the cubic radial (SIP) distortion at the
    focal-plane corner; the TAN projection adds its own small cos^3 term."""
    vignetting_at_corner: float = 0.04
    """Fractional illumination loss at the focal-plane corner (dome and sky alike)."""
    defect_fraction: float = 2e-4
    """Fraction of pixels that are hot, and separately that are dead."""
    bad_column_probability: float = 0.25
    """Probability that a quadrant has one hot column."""
    dust_per_quadrant: float = 1.0
    """Mean number of dust donuts per quadrant."""
    cosmics_per_mpix: float = 5.0
    """Mean cosmic-ray hits per megapixel in a 30 s exposure."""
    site_longitude_deg: float = -116.8650
    """East-positive site longitude (Palomar); defines the observing night."""
    site_latitude_deg: float = 33.3563
    """Site latitude; defines airmass."""


@dataclass(frozen=True)
class InstrumentConfig:
    """Instrument 'domain': what differs between two surveys on similar skies."""

    name: str = "SIMCAM-A"
    domain: int = 0
    gain_e_per_adu: float = 6.0
    """Mean gain; quadrants scatter around it by ``gain_spread``."""
    gain_spread: float = 0.05
    read_noise_e: float = 8.0
    full_well_e: float = 300_000.0
    bias_level_adu: tuple[float, float] = (950.0, 1100.0)
    """Range of per-quadrant bias levels."""
    psf: Literal["moffat", "gaussian"] = "moffat"
    moffat_beta: float = 3.5
    seeing_median_arcsec: float = 2.0
    zp_e_per_s: dict[str, float] = field(default_factory=lambda: {"g": 24.8, "r": 24.6, "i": 24.2})
    """Magnitude giving 1 e-/s above the atmosphere, per band."""
    colour_term: dict[str, float] = field(
        default_factory=lambda: {"g": 0.06, "r": -0.03, "i": 0.04}
    )
    """m_survey = m_ref + colour_term * (bp_rp - 1)."""
    quadrant_throughput_spread: float = 0.03
    """Per-quadrant, per-band QE level scatter (fractional)."""
    prnu: float = 0.01
    """Pixel-to-pixel QE scatter (fractional rms)."""
    starflat_amplitude_mag: float = 0.010
    """Scale of the illumination pattern the dome flat misses (per-band scaled)."""
    bias_jump_adu: float = 0.0
    """A step in the bias structure (after overscan) from night ``bias_jump_night``
    on, as after an electronics intervention; the stability monitor must see it."""
    bias_jump_night: int = 1


INSTRUMENTS: dict[str, InstrumentConfig] = {
    "A": InstrumentConfig(),
    "B": InstrumentConfig(
        name="SIMCAM-B",
        domain=1,
        gain_e_per_adu=2.1,
        gain_spread=0.08,
        read_noise_e=4.5,
        full_well_e=120_000.0,
        bias_level_adu=(400.0, 600.0),
        psf="gaussian",
        seeing_median_arcsec=1.5,
        zp_e_per_s={"g": 24.3, "r": 24.2, "i": 23.9},
        colour_term={"g": 0.10, "r": 0.02, "i": -0.05},
        quadrant_throughput_spread=0.05,
        prnu=0.015,
        starflat_amplitude_mag=0.011,
    ),
}


@dataclass(frozen=True)
class ScheduleConfig:
    """What is observed, when."""

    first_night: str = "2026-03-10"
    """Local date of the evening of the first night (YYYY-MM-DD)."""
    n_nights: int = 2
    bands: tuple[Band, ...] = ("g", "r")
    n_bias: int = 5
    n_dark: int = 1
    leds_per_band: int = 3
    n_flat_per_led: int = 2
    n_science: int = 10
    """Science exposures per night, cycling through ``bands``."""
    exptime_s: float = 30.0
    n_fields: int = 1
    field_ra_deg: float | None = None
    """Field centre; ``None`` picks the RA that transits at local midnight."""
    field_dec_deg: float = 15.0
    dither_fraction: float = 0.35
    """Pointing dithers, uniform in +-fraction of the focal-plane size."""
    cloudy_fraction: float = 0.5
    """Probability that a night after the first is cloudy (the first is clear,
    the second cloudy when there are at least two nights)."""


@dataclass(frozen=True)
class SkyConfig:
    stars_per_quadrant: float = 3000.0
    """Expected stars (13 < r < 22) over one quadrant's area."""
    mag_range: tuple[float, float] = (13.0, 22.0)
    refcat_limit_mag: float = 21.0
    """Stars brighter than this (r) are in the reference catalog."""
    variable_fraction: float = 0.03


@dataclass(frozen=True)
class SceneConfig:
    """Host galaxies and the transients they hold (sim/hosts.py, docs/lightcurves.md).

    Times are fractions of the survey's span of science exposures, so any
    schedule samples a light curve: zero flux before the explosion, a rise, a
    decline. Magnitudes are in the survey's natural system, band r; the other
    bands follow from the colours.
    """

    n_transients: int = 2
    """Transients, each in its own host galaxy."""
    host_mag_range: tuple[float, float] = (16.5, 20.5)
    """Total r magnitude of the hosts (uniform)."""
    host_r_eff_arcsec: tuple[float, float] = (1.0, 3.5)
    """Half-light radius along the major axis (uniform)."""
    host_sersic_n: tuple[float, float] = (0.8, 4.0)
    """Sersic index (uniform): exponential disks to de Vaucouleurs bulges."""
    host_axis_ratio: tuple[float, float] = (0.5, 1.0)
    """Minor over major axis (uniform)."""
    host_g_r: tuple[float, float] = (0.4, 0.9)
    """Host colour g - r; r - i is half of it."""
    offset_r_eff: tuple[float, float] = (0.0, 1.2)
    """Distance of the transient from its host's centre, in half-light radii
    along the host's own (elliptical) radius."""
    peak_mag_range: tuple[float, float] = (17.0, 19.5)
    """Peak r magnitude of the transients (uniform)."""
    transient_g_r: tuple[float, float] = (-0.2, 0.3)
    """Transient colour g - r; r - i is half of it."""
    explosion_fraction: tuple[float, float] = (0.3, 0.5)
    """Explosion time, as a fraction of the span of science exposures."""
    rise_fraction: tuple[float, float] = (0.1, 0.2)
    """Rise time (explosion to peak), fraction of the span."""
    decline_mag_per_span: tuple[float, float] = (1.0, 2.5)
    """Decline after the peak, magnitudes per span (linear in magnitude)."""
    placement_fraction: float = 0.4
    """Hosts lie within this fraction of the mosaic's half-size of the field
    centre (dithers then move them over several quadrants)."""
    min_separation_arcsec: float = 30.0
    """Smallest distance between two hosts."""
    clear_of_bright_arcsec: float = 8.0
    """No star brighter than ``clear_of_bright_mag`` (or variable) this close to a
    transient: static neighbours are modelled, variable or saturated ones are not."""
    clear_of_bright_mag: float = 15.0
    baseline_margin_fraction: float = 0.1
    """The targets table's ``no_flux_before`` is the explosion time minus this
    fraction of the span: some epochs before the explosion lie after it."""

    def __post_init__(self) -> None:
        if self.n_transients < 0:
            raise ValueError(f"n_transients must be >= 0, got {self.n_transients}")
        for name in (
            "host_mag_range",
            "host_r_eff_arcsec",
            "host_sersic_n",
            "host_axis_ratio",
            "offset_r_eff",
            "peak_mag_range",
            "explosion_fraction",
            "rise_fraction",
            "decline_mag_per_span",
        ):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be a range lo <= hi, got {(lo, hi)}")
        if self.host_sersic_n[0] < 0.3:
            raise ValueError(f"host_sersic_n must be >= 0.3, got {self.host_sersic_n}")


@dataclass(frozen=True)
class SurveyConfig:
    """A whole simulated survey."""

    preset: str
    camera: CameraConfig
    instrument: InstrumentConfig
    schedule: ScheduleConfig
    sky: SkyConfig
    seed: int = 0
    truth_pixel_maps: bool = True
    """Write per-pixel truth maps (area, flat, starflat, bias, defects). Off for
    the full-size preset, where each map is 2.4 GB."""
    scene: SceneConfig | None = None
    """Host galaxies and transients with light curves; None (every preset's
    default) renders exactly the survey without them."""

    def replace(self, **changes: object) -> SurveyConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _tiny() -> SurveyConfig:
    return SurveyConfig(
        preset="tiny",
        camera=CameraConfig(
            ccd_cols=(1, 2),
            ccd_rows=(1,),
            quad_nx=128,
            quad_ny=128,
            n_overscan=8,
            ccd_gap_px=6,
            defect_fraction=1e-3,
            dust_per_quadrant=0.5,
            cosmics_per_mpix=150.0,
        ),
        instrument=INSTRUMENTS["A"],
        schedule=ScheduleConfig(
            n_nights=2,
            bands=("r",),
            n_bias=3,
            n_dark=1,
            leds_per_band=3,
            n_flat_per_led=1,
            n_science=4,
            dither_fraction=0.3,
        ),
        sky=SkyConfig(stars_per_quadrant=60.0),
    )


def _small() -> SurveyConfig:
    return SurveyConfig(
        preset="small",
        camera=CameraConfig(
            ccd_cols=(1, 2),
            ccd_rows=(1, 2),
            quad_nx=512,
            quad_ny=512,
            n_overscan=16,
            ccd_gap_px=20,
            defect_fraction=3e-4,
            dust_per_quadrant=0.7,
            cosmics_per_mpix=20.0,
        ),
        instrument=INSTRUMENTS["A"],
        schedule=ScheduleConfig(
            n_nights=2,
            bands=("g", "r"),
            n_bias=5,
            n_dark=1,
            leds_per_band=3,
            n_flat_per_led=2,
            n_science=12,
            dither_fraction=0.3,
        ),
        sky=SkyConfig(stars_per_quadrant=600.0),
    )


def _ztf() -> SurveyConfig:
    return SurveyConfig(
        preset="ztf",
        camera=CameraConfig(),
        instrument=INSTRUMENTS["A"],
        schedule=ScheduleConfig(
            n_nights=1,
            bands=("r",),
            n_bias=3,
            n_dark=0,
            leds_per_band=3,
            n_flat_per_led=1,
            n_science=2,
            dither_fraction=0.1,
        ),
        sky=SkyConfig(stars_per_quadrant=10_000.0),
        truth_pixel_maps=False,
    )


def _field() -> SurveyConfig:
    """One CCD at the star density of ``small``, observed every night: enough clean
    stars per quadrant for PSF models and ubercal, and a cadence for light curves
    (with ``transients``)."""
    return SurveyConfig(
        preset="field",
        camera=CameraConfig(
            ccd_cols=(1,),
            ccd_rows=(1,),
            quad_nx=192,
            quad_ny=192,
            n_overscan=8,
            ccd_gap_px=6,
            defect_fraction=3e-4,
            dust_per_quadrant=0.5,
            cosmics_per_mpix=20.0,
        ),
        instrument=INSTRUMENTS["A"],
        schedule=ScheduleConfig(
            n_nights=6,
            bands=("r",),
            n_bias=3,
            n_dark=0,
            leds_per_band=3,
            n_flat_per_led=1,
            n_science=3,
            dither_fraction=0.3,
        ),
        sky=SkyConfig(stars_per_quadrant=80.0),
    )


PRESETS = {"tiny": _tiny, "small": _small, "ztf": _ztf, "field": _field}


def make_config(
    preset: str,
    *,
    seed: int = 0,
    nights: int | None = None,
    domain: str = "A",
    transients: int | None = None,
) -> SurveyConfig:
    """Build a survey configuration from a named preset.

    Parameters
    ----------
    preset : {'tiny', 'small', 'ztf', 'field'}
        ``tiny``: 8 quadrants of 128x128 px, seconds. ``small``: 16 quadrants of
        512x512 px, two nights in g and r. ``ztf``: the full 64-quadrant,
        3072x3080 focal plane, for benchmarks. ``field``: one CCD of 192x192 px
        quadrants, six nights of three r exposures, for light curves.
    seed : int
        Seed of every random draw.
    nights : int, optional
        Override the number of nights.
    domain : {'A', 'B'}
        Instrument domain (B: different gain, PSF, throughput, colour terms).
    transients : int, optional
        Add this many transients in host galaxies (:class:`SceneConfig`
        defaults); without it the preset renders exactly as before.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {sorted(PRESETS)}")
    if domain not in INSTRUMENTS:
        raise ValueError(f"domain {domain!r} is not one of {sorted(INSTRUMENTS)}")
    if nights is not None and nights < 1:
        raise ValueError(f"nights must be >= 1, got {nights}")
    cfg = PRESETS[preset]().replace(seed=int(seed), instrument=INSTRUMENTS[domain])
    if nights is not None:
        cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, n_nights=nights))
    if transients is not None:
        cfg = cfg.replace(scene=SceneConfig(n_transients=int(transients)))
    return cfg
