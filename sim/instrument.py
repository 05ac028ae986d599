"""Fixed properties of the simulated instrument, per quadrant: gain, bias
structure, quantum efficiency, vignetting, dust, defects, dome-flat LED colour,
and the illumination pattern ("starflat") that the dome flat does not capture.

Response model (pixel i, band b):

- dome flat, LED l:   area_i * qe_b,q * prnu_i * vign_i * dust_i * (1 + a_l * chroma_i)
- sky background:     area_i * qe_b,q * prnu_i * vign_i * dust_i * S_b,i
- a star's light:              qe_b,q * prnu_i * vign_i * dust_i * S_b,i

so a dome-flattened frame is a surface-brightness image (BRIEF §1 step 2), and
``S = 10**(0.4 * dzp_starflat)`` is what remains after the flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from calib.bits import MASK_DEAD, MASK_HOT
from sim._random import rng_for
from sim.camera import Camera
from sim.config import SurveyConfig

_STARFLAT_BAND_SCALE = {"g": 1.2, "r": 1.0, "i": 0.85}
_BIAS_DRIFT_ADU_PER_NIGHT = 0.02


@dataclass(frozen=True)
class QuadrantElectronics:
    gain_e_per_adu: float
    read_noise_e: float
    bias_level_adu: float
    saturate_adu: float
    full_well_e: float


class Instrument:
    """Per-quadrant maps of one simulated instrument, drawn from the config seed."""

    def __init__(self, config: SurveyConfig, camera: Camera) -> None:
        self.config = config
        self.camera = camera
        self.inst = config.instrument
        self.seed = config.seed
        # Focal-plane means are costly (they visit every quadrant): computed once.
        self._flat_norms: dict[str, float] = {}

    # -- electronics ---------------------------------------------------------
    def electronics(self, quadrant: int) -> QuadrantElectronics:
        rng = rng_for(self.seed, "electronics", quadrant)
        gain = self.inst.gain_e_per_adu * (1.0 + self.inst.gain_spread * rng.standard_normal())
        lo, hi = self.inst.bias_level_adu
        level = rng.uniform(lo, hi)
        read_noise = self.inst.read_noise_e * rng.uniform(0.9, 1.1)
        full_well = self.inst.full_well_e
        saturate = np.floor(min(level + full_well / gain, 65535.0) * 0.98)
        return QuadrantElectronics(
            float(gain), float(read_noise), float(level), float(saturate), float(full_well)
        )

    def bias_level(self, quadrant: int, night_index: int, frame_key: object) -> float:
        """Bias level of one frame: it drifts between nights and jitters per frame;
        the overscan tracks it exactly."""
        base = self.electronics(quadrant).bias_level_adu
        walk = rng_for(self.seed, "bias-walk", quadrant).normal(0.0, 2.0, size=night_index + 1)
        jitter = rng_for(self.seed, "bias-jitter", quadrant, frame_key).normal(0.0, 0.5)
        return float(base + walk[: night_index + 1].sum() + jitter)

    # -- defects -------------------------------------------------------------
    def defects(self, quadrant: int) -> np.ndarray:
        """Defect bit mask (ny, nx): 1 hot, 2 dead."""
        g = self.camera.by_id[quadrant]
        rng = rng_for(self.seed, "defects", quadrant)
        mask = np.zeros((g.ny, g.nx), dtype=np.uint8)
        n = g.nx * g.ny
        frac = self.config.camera.defect_fraction
        hot = rng.choice(n, size=rng.poisson(frac * n), replace=False)
        dead = rng.choice(n, size=rng.poisson(frac * n), replace=False)
        mask.flat[hot] |= MASK_HOT
        mask.flat[dead] |= MASK_DEAD
        if rng.uniform() < self.config.camera.bad_column_probability:
            mask[:, rng.integers(g.nx)] |= MASK_HOT
        return mask

    def hot_offsets_adu(self, quadrant: int) -> np.ndarray:
        """Extra bias of hot pixels (ADU, (ny, nx)); zero elsewhere."""
        g = self.camera.by_id[quadrant]
        mask = self.defects(quadrant)
        rng = rng_for(self.seed, "hot-offsets", quadrant)
        offsets = np.zeros((g.ny, g.nx))
        hot = (mask & MASK_HOT) != 0
        offsets[hot] = rng.uniform(30.0, 2000.0, size=int(hot.sum()))
        return offsets

    # -- bias ----------------------------------------------------------------
    def bias_pattern(self, quadrant: int, night_index: int) -> np.ndarray:
        """Overscan-subtracted bias structure in ADU, (ny, nx), for one night:
        column structure, a gentle gradient that drifts slowly between nights,
        and hot pixels."""
        g = self.camera.by_id[quadrant]
        rng = rng_for(self.seed, "bias-pattern", quadrant)
        columns = rng.normal(0.0, 1.5, size=g.nx)
        gx, gy, drift_dir = rng.normal(0.0, 1.0, size=3)
        x = np.linspace(-1.0, 1.0, g.nx)
        y = np.linspace(-1.0, 1.0, g.ny)[:, None]
        shape = gx * x + gy * y
        drift = _BIAS_DRIFT_ADU_PER_NIGHT * night_index * np.sign(drift_dir)
        jump = self.inst.bias_jump_adu if night_index >= self.inst.bias_jump_night else 0.0
        return columns + (1.0 + drift) * shape + jump + self.hot_offsets_adu(quadrant)

    # -- response ------------------------------------------------------------
    def qe_level(self, quadrant: int, band: str) -> float:
        """Quadrant throughput in a band relative to the nominal instrument."""
        rng = rng_for(self.seed, "qe-level", quadrant, band)
        return float(1.0 + self.inst.quadrant_throughput_spread * rng.standard_normal())

    def prnu(self, quadrant: int) -> np.ndarray:
        """Pixel QE (ny, nx): white pixel-to-pixel scatter, low-frequency structure,
        and dead pixels."""
        g = self.camera.by_id[quadrant]
        rng = rng_for(self.seed, "prnu", quadrant)
        qe = 1.0 + self.inst.prnu * rng.standard_normal((g.ny, g.nx))
        x = np.linspace(0.0, 1.0, g.nx)
        y = np.linspace(0.0, 1.0, g.ny)[:, None]
        for _ in range(3):
            kx, ky = rng.uniform(0.5, 3.0, size=2)
            px, py = rng.uniform(0.0, 2 * np.pi, size=2)
            qe += 0.003 * np.cos(2 * np.pi * kx * x + px) * np.cos(2 * np.pi * ky * y + py)
        dead = (self.defects(quadrant) & MASK_DEAD) != 0
        qe[dead] *= rng.uniform(0.0, 0.5, size=int(dead.sum()))
        return qe

    def vignetting(self, quadrant: int) -> np.ndarray:
        r = self.camera.radius_norm(quadrant)
        return 1.0 - self.config.camera.vignetting_at_corner * r * r

    def dust(self, quadrant: int) -> np.ndarray:
        """Dust donuts: shadow rings of out-of-focus dust grains, (ny, nx)."""
        g = self.camera.by_id[quadrant]
        rng = rng_for(self.seed, "dust", quadrant)
        out = np.ones((g.ny, g.nx))
        size = min(g.nx, g.ny)
        for _ in range(rng.poisson(self.config.camera.dust_per_quadrant)):
            cx, cy = rng.uniform(0, g.nx), rng.uniform(0, g.ny)
            r_out = rng.uniform(0.03, 0.08) * size + 3.0
            r_in = 0.55 * r_out
            depth = rng.uniform(0.01, 0.03)
            # Only the donut's neighbourhood: the logistic edges are < 1e-9 beyond it.
            reach = r_out + 25.0
            y0, y1 = max(0, int(cy - reach)), min(g.ny, int(cy + reach) + 1)
            x0, x1 = max(0, int(cx - reach)), min(g.nx, int(cx + reach) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r = np.hypot(xx - cx, yy - cy)
            ring = expit(r_out - r) - expit(r_in - r)
            out[y0:y1, x0:x1] *= 1.0 - depth * ring
        return out

    def chroma(self, quadrant: int) -> np.ndarray:
        """Spatial pattern of the flat's colour dependence (ny, nx), ~0.5 %."""
        r = self.camera.radius_norm(quadrant)
        u, _ = self.camera.offsets(quadrant)
        tilt = rng_for(self.seed, "chroma", quadrant).normal(0.0, 0.002)
        return 0.005 * (r * r - 0.3) + tilt * u / self.camera.corner_radius_px

    def led_coefficients(self, band: str) -> np.ndarray:
        """Colour coefficient of each LED of a band; they average to zero, so the
        mean of the LED flats is the band's flat."""
        n = self.config.schedule.leds_per_band
        base = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
        return base * rng_for(self.seed, "led", band).uniform(0.8, 1.2)

    def common_response(self, quadrant: int, band: str) -> np.ndarray:
        """QE x vignetting x dust (ny, nx): what stars, sky and dome light share."""
        return (
            self.qe_level(quadrant, band)
            * self.prnu(quadrant)
            * self.vignetting(quadrant)
            * self.dust(quadrant)
        )

    def flat_response(self, quadrant: int, band: str) -> np.ndarray:
        """Un-normalised dome-flat response (ny, nx), LED colour averaged out."""
        return self.camera.area_map(quadrant) * self.common_response(quadrant, band)

    def flat_norm(self, band: str) -> float:
        """Mean dome-flat response over the good pixels of the whole focal plane:
        the true flat is ``flat_response / flat_norm`` (mean 1 per band)."""
        if band not in self._flat_norms:
            total = count = 0.0
            for g in self.camera.quadrants:
                good = self.defects(g.quadrant) == 0
                resp = self.flat_response(g.quadrant, band)
                total += float(resp[good].sum())
                count += float(good.sum())
            self._flat_norms[band] = total / count
        return self._flat_norms[band]

    def true_flat(self, quadrant: int, band: str) -> np.ndarray:
        return self.flat_response(quadrant, band) / self.flat_norm(band)

    # -- starflat ------------------------------------------------------------
    def _starflat_raw(self, quadrant: int, band: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        amp = self.inst.starflat_amplitude_mag * _STARFLAT_BAND_SCALE[band]
        rng = rng_for(self.seed, "starflat", band)
        c_lin_x, c_lin_y, c_xy = rng.uniform(-0.5, 0.5, size=3)
        R = self.camera.corner_radius_px
        xn, yn = u / R, v / R
        glob = amp * ((xn * xn + yn * yn) + c_lin_x * xn + c_lin_y * yn + c_xy * xn * yn)
        g = self.camera.by_id[quadrant]
        q_off, q_gx, q_gy = rng_for(self.seed, "starflat-q", band, quadrant).normal(
            0.0, 0.2 * amp, size=3
        )
        lx = (u + self.camera.axis_x - g.x0) / g.nx - 0.5
        ly = (v + self.camera.axis_y - g.y0) / g.ny - 0.5
        return glob + q_off + 2.0 * (q_gx * lx + q_gy * ly)

    def _starflat_mean(self, band: str) -> float:
        key = f"starflat-mean-{band}"
        if key not in self._flat_norms:
            vals = []
            for g in self.camera.quadrants:
                u = g.x0 + np.linspace(0, g.nx - 1, 32) - self.camera.axis_x
                v = g.y0 + np.linspace(0, g.ny - 1, 32) - self.camera.axis_y
                uu, vv = np.meshgrid(u, v)
                vals.append(self._starflat_raw(g.quadrant, band, uu, vv).mean())
            self._flat_norms[key] = float(np.mean(vals))
        return self._flat_norms[key]

    def starflat_at(self, quadrant: int, band: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Starflat dzp [mag] at pixel offsets (u, v) from the axis; zero mean over
        the focal plane. ``m = m_inst + zp + dzp``."""
        return self._starflat_raw(quadrant, band, u, v) - self._starflat_mean(band)

    def starflat(self, quadrant: int, band: str) -> np.ndarray:
        """Starflat dzp map [mag], (ny, nx)."""
        u, v = self.camera.offsets(quadrant)
        return self.starflat_at(quadrant, band, u, v)
