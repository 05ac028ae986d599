"""The simulated sky: stars with magnitudes, colours and variability, and the
reference catalog (a noisy, colour-transformed view of them, Gaia-like).

Two magnitude systems exist: the reference system (what the catalog reports)
and the survey's natural system, ``m_survey = m_ref + colour_term * (bp_rp - 1)``.
Truth magnitudes are in the survey system.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim._random import rng_for
from sim.config import BANDS, SurveyConfig

BP_RP_PIVOT = 1.0


@dataclass(frozen=True)
class StarCatalog:
    """Every simulated star, ordered by ``source_id``."""

    source_id: np.ndarray  # (n,) int64
    ra_deg: np.ndarray  # (n,)
    dec_deg: np.ndarray  # (n,)
    bp_rp: np.ndarray  # (n,)
    mag: dict[str, np.ndarray]  # band -> (n,) survey-system mean magnitude
    ref_mag: dict[str, np.ndarray]  # band -> (n,) reference-system, noiseless
    ref_mag_obs: dict[str, np.ndarray]  # band -> (n,) as the catalog reports it
    ref_magerr: dict[str, np.ndarray]  # band -> (n,)
    var_amp_mag: np.ndarray  # (n,) 0 for constant stars
    var_period_d: np.ndarray  # (n,)
    var_phase: np.ndarray  # (n,) radians
    in_refcat: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.source_id)

    def mag_at(self, band: str, mjd: float, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Survey-system magnitude at time ``mjd``: mean + sinusoidal variability."""
        phase = 2 * np.pi * mjd / self.var_period_d[index] + self.var_phase[index]
        return self.mag[band][index] + self.var_amp_mag[index] * np.sin(phase)


def _draw_magnitudes(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    # Counts grow as 10^(0.3 m), as for field stars at these magnitudes.
    a, b = 10 ** (0.3 * lo), 10 ** (0.3 * hi)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / 0.3


def make_catalog(
    config: SurveyConfig,
    *,
    center_ra_deg: float,
    center_dec_deg: float,
    half_width_deg: float,
    half_height_deg: float,
    quadrant_area_deg2: float,
) -> StarCatalog:
    """Draw the stars of a rectangular patch of sky around a centre."""
    sky = config.sky
    rng = rng_for(config.seed, "catalog")
    dec_lo = np.deg2rad(center_dec_deg - half_height_deg)
    dec_hi = np.deg2rad(center_dec_deg + half_height_deg)
    dra = half_width_deg / np.cos(np.deg2rad(center_dec_deg))
    area = np.rad2deg(2 * np.deg2rad(dra)) * np.rad2deg(np.sin(dec_hi) - np.sin(dec_lo))
    n = int(rng.poisson(sky.stars_per_quadrant / quadrant_area_deg2 * area))
    ra = center_ra_deg + rng.uniform(-dra, dra, size=n)
    dec = np.rad2deg(np.arcsin(rng.uniform(np.sin(dec_lo), np.sin(dec_hi), size=n)))
    r_ref = _draw_magnitudes(rng, n, *sky.mag_range)
    bp_rp = np.clip(rng.normal(1.0, 0.45, size=n), 0.1, 3.5)
    ref_mag = {
        "g": r_ref + 0.75 * bp_rp - 0.15,
        "r": r_ref,
        "i": r_ref - 0.45 * bp_rp + 0.10,
    }
    colour_term = config.instrument.colour_term
    mag = {b: ref_mag[b] + colour_term[b] * (bp_rp - BP_RP_PIVOT) for b in BANDS}
    ref_magerr = {b: 0.002 + 0.03 * 10 ** (0.4 * (ref_mag[b] - 21.0)) for b in BANDS}
    ref_mag_obs = {b: ref_mag[b] + ref_magerr[b] * rng.standard_normal(n) for b in BANDS}
    variable = rng.uniform(size=n) < sky.variable_fraction
    amp = np.where(variable, rng.uniform(0.05, 0.5, size=n), 0.0)
    period = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=n))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    # Gaia-like identifiers: large, unique, unordered with position.
    ids = np.sort(rng.choice(2**50, size=n, replace=False).astype(np.int64) + 10**15)
    return StarCatalog(
        source_id=ids,
        ra_deg=ra,
        dec_deg=dec,
        bp_rp=bp_rp,
        mag=mag,
        ref_mag=ref_mag,
        ref_mag_obs=ref_mag_obs,
        ref_magerr=ref_magerr,
        var_amp_mag=amp,
        var_period_d=period,
        var_phase=phase,
        in_refcat=r_ref < sky.refcat_limit_mag,
    )
