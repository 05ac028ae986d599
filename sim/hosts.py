"""Host galaxies and transients with light curves (docs/lightcurves.md).

Each transient sits in its own host galaxy, a Sersic profile (exponential disks
to de Vaucouleurs bulges, elliptical) over a range of brightness and size, so
the surface brightness under the transient spans faint to bright. The transient
is a point source whose flux is zero before its explosion, rises as the square
of the time since explosion to a peak, then declines linearly in magnitude.

Both are rendered into the science exposures as the stars are: the light is
round on the sky and convolved by the exposure's PSF there, then mapped onto
the detector through the distortion Jacobian; a point source's fluence is
conserved, a galaxy's pixels collect its surface brightness times their solid
angle. The truth (positions, host parameters, the light curves and every
epoch's expected flux) goes to the truth store (``tasks.io.truth``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal
from scipy.special import gamma, gammaincinv

from calib.fluxscale import AB_NJY_ZERO_POINT
from sim._random import rng_for
from sim.catalog import StarCatalog
from sim.config import BANDS, SceneConfig

__all__ = [
    "AB_NJY_ZERO_POINT",
    "GalaxiesOnQuadrant",
    "SceneCatalog",
    "add_galaxies",
    "galaxy_profile",
    "make_scene",
    "sersic_b",
]


def sersic_b(n: float | np.ndarray) -> np.ndarray:
    """``b_n`` such that half the light of a Sersic profile lies within ``r_eff``
    (exact: the median of a Gamma(2n) variable)."""
    return np.asarray(gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5))


def sersic_mean_sb_within_reff(total_mag: np.ndarray, r_eff_arcsec: np.ndarray, q: np.ndarray):
    """Mean surface brightness within the half-light ellipse, mag/arcsec^2."""
    return total_mag + 2.5 * np.log10(2.0 * np.pi * q * r_eff_arcsec**2)


def sersic_sb(total_mag, r_eff_arcsec, n, q, r_ell_arcsec) -> np.ndarray:
    """Surface brightness at elliptical radius ``r_ell`` (major-axis units),
    mag/arcsec^2, of a Sersic profile of total magnitude ``total_mag``."""
    b = sersic_b(n)
    # L = 2 pi q n r_e^2 I_e e^b b^(-2n) Gamma(2n)
    log_ie = -0.4 * np.asarray(total_mag) * np.log(10.0) - np.log(
        2.0 * np.pi * q * n * r_eff_arcsec**2 * gamma(2.0 * n)
    )
    log_ie += -b + 2.0 * n * np.log(b)
    log_i = log_ie - b * ((np.asarray(r_ell_arcsec) / r_eff_arcsec) ** (1.0 / n) - 1.0)
    return -2.5 * log_i / np.log(10.0)


@dataclass(frozen=True)
class SceneCatalog:
    """The transients and their hosts, one row per transient (host ``k`` holds
    transient ``k``).

    Magnitudes are in the survey's natural system. Light-curve shape, the same
    in every band: ``s(t) = 0`` before ``t_explosion``, ``((t - t0) / t_rise)^2``
    up to ``t_peak = t0 + t_rise``, then ``10**(-0.4 decline (t - t_peak))``.
    """

    name: np.ndarray  # (n,) str, safe store group names
    ra_deg: np.ndarray  # (n,) transient
    dec_deg: np.ndarray  # (n,)
    host_ra_deg: np.ndarray  # (n,)
    host_dec_deg: np.ndarray  # (n,)
    host_mag: dict[str, np.ndarray]  # band -> (n,) total magnitude
    r_eff_arcsec: np.ndarray  # (n,) along the major axis
    sersic_n: np.ndarray  # (n,)
    axis_ratio: np.ndarray  # (n,)
    pa_deg: np.ndarray  # (n,) major axis, from +x (mosaic columns) towards +y
    offset_r_eff: np.ndarray  # (n,) elliptical radius of the transient / r_eff
    t_explosion_mjd: np.ndarray  # (n,)
    t_rise_d: np.ndarray  # (n,)
    decline_mag_per_d: np.ndarray  # (n,)
    peak_mag: dict[str, np.ndarray]  # band -> (n,)
    no_flux_before_mjd: np.ndarray  # (n,) what a targets table would say

    def __len__(self) -> int:
        return len(self.name)

    @property
    def t_peak_mjd(self) -> np.ndarray:
        return self.t_explosion_mjd + self.t_rise_d

    def shape_at(self, mjd: float) -> np.ndarray:
        """Light-curve shape ``s(t)`` (0 before explosion, 1 at peak), shape (n,)."""
        dt = mjd - self.t_explosion_mjd
        rise = np.clip(dt / self.t_rise_d, 0.0, None) ** 2
        decline = 10 ** (-0.4 * self.decline_mag_per_d * (mjd - self.t_peak_mjd))
        return np.where(dt <= 0, 0.0, np.where(mjd < self.t_peak_mjd, rise, decline))

    def flux_njy(self, band: str, mjd: float) -> np.ndarray:
        """True calibrated flux at ``mjd``, nJy, shape (n,)."""
        peak = 10 ** (-0.4 * (self.peak_mag[band] - AB_NJY_ZERO_POINT))
        return peak * self.shape_at(mjd)

    def mag_at(self, band: str, mjd: float) -> np.ndarray:
        """Magnitude at ``mjd``; inf before the explosion, shape (n,)."""
        with np.errstate(divide="ignore"):
            return -2.5 * np.log10(self.flux_njy(band, mjd)) + AB_NJY_ZERO_POINT

    def host_sb_at_transient(self, band: str) -> np.ndarray:
        """Host surface brightness at the transient (before the PSF), mag/arcsec^2."""
        return sersic_sb(
            self.host_mag[band],
            self.r_eff_arcsec,
            self.sersic_n,
            self.axis_ratio,
            self.offset_r_eff * self.r_eff_arcsec,
        )

    def host_sb_eff(self, band: str) -> np.ndarray:
        """Host mean surface brightness within its half-light ellipse, mag/arcsec^2."""
        return sersic_mean_sb_within_reff(self.host_mag[band], self.r_eff_arcsec, self.axis_ratio)


def _clear_of(
    ra: float, dec: float, stars: StarCatalog, radius_deg: float, bright_mag: float
) -> bool:
    near = (np.abs(stars.dec_deg - dec) < radius_deg) & (
        np.abs((stars.ra_deg - ra + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec))
        < radius_deg
    )
    idx = np.flatnonzero(near)
    if not len(idx):
        return True
    d = np.hypot(
        ((stars.ra_deg[idx] - ra + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec)),
        stars.dec_deg[idx] - dec,
    )
    bad = (stars.mag["r"][idx] < bright_mag) | (stars.var_amp_mag[idx] > 0)
    return not np.any(bad & (d < radius_deg))


def make_scene(
    config: SceneConfig,
    *,
    seed: int,
    stars: StarCatalog,
    center_ra_deg: float,
    center_dec_deg: float,
    half_size_deg: tuple[float, float],
    span_mjd: tuple[float, float],
) -> SceneCatalog:
    """Draw hosts and transients around a field centre.

    Parameters
    ----------
    config : SceneConfig
    seed : int
        The survey's seed (the scene has its own random stream).
    stars : StarCatalog
        Keeps transients clear of bright and variable stars.
    center_ra_deg, center_dec_deg : float
        Field centre.
    half_size_deg : tuple of float
        Mosaic half-size (x, y); hosts are placed within
        ``config.placement_fraction`` of it.
    span_mjd : tuple of float
        First and last science exposure: light curves are drawn on this span.
    """
    rng = rng_for(seed, "scene")
    n = config.n_transients
    t0, t1 = span_mjd
    span = max(t1 - t0, 1e-3)
    cosd = math.cos(math.radians(center_dec_deg))
    reach = tuple(config.placement_fraction * h for h in half_size_deg)
    host_mag_r = rng.uniform(*config.host_mag_range, size=n)
    r_eff = rng.uniform(*config.host_r_eff_arcsec, size=n)
    sersic = rng.uniform(*config.host_sersic_n, size=n)
    q = rng.uniform(*config.host_axis_ratio, size=n)
    pa = rng.uniform(0.0, 180.0, size=n)
    offset = rng.uniform(*config.offset_r_eff, size=n)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    placed: list[tuple[float, float, float, float]] = []
    for k in range(n):
        for _ in range(1000):
            hra = center_ra_deg + rng.uniform(-reach[0], reach[0]) / cosd
            hdec = center_dec_deg + rng.uniform(-reach[1], reach[1])
            # The transient at elliptical radius offset * r_eff, angle in the host frame.
            r = offset[k] * r_eff[k]
            a, b = r * math.cos(angle[k]), r * q[k] * math.sin(angle[k])
            c, s = math.cos(math.radians(pa[k])), math.sin(math.radians(pa[k]))
            dx_arcsec, dy_arcsec = a * c - b * s, a * s + b * c
            # Mosaic +x is -RA (CD1_1 < 0), +y is +Dec.
            tra = hra - dx_arcsec / 3600.0 / cosd
            tdec = hdec + dy_arcsec / 3600.0
            far = all(
                math.hypot((hra - p[0]) * cosd, hdec - p[1]) * 3600.0
                >= config.min_separation_arcsec
                for p in placed
            )
            if far and _clear_of(
                tra, tdec, stars, config.clear_of_bright_arcsec / 3600.0, config.clear_of_bright_mag
            ):
                placed.append((hra, hdec, tra, tdec))
                break
        else:
            raise ValueError(
                f"no room for {n} hosts {config.min_separation_arcsec} arcsec apart within "
                f"{config.placement_fraction} of the field: lower n_transients"
            )
    arr = np.array(placed, dtype=np.float64).reshape(n, 4)
    host_g_r = rng.uniform(*config.host_g_r, size=n)
    peak_r = rng.uniform(*config.peak_mag_range, size=n)
    sn_g_r = rng.uniform(*config.transient_g_r, size=n)
    t_exp = t0 + rng.uniform(*config.explosion_fraction, size=n) * span
    t_rise = rng.uniform(*config.rise_fraction, size=n) * span
    decline = rng.uniform(*config.decline_mag_per_span, size=n) / span

    def bands(r: np.ndarray, g_r: np.ndarray) -> dict[str, np.ndarray]:
        return {"g": r + g_r, "r": r, "i": r - 0.5 * g_r}

    return SceneCatalog(
        name=np.array([f"SIM{k + 1:03d}" for k in range(n)], dtype=object),
        ra_deg=arr[:, 2] % 360.0,
        dec_deg=arr[:, 3],
        host_ra_deg=arr[:, 0] % 360.0,
        host_dec_deg=arr[:, 1],
        host_mag={b: v for b, v in bands(host_mag_r, host_g_r).items() if b in BANDS},
        r_eff_arcsec=r_eff,
        sersic_n=sersic,
        axis_ratio=q,
        pa_deg=pa,
        offset_r_eff=offset,
        t_explosion_mjd=t_exp,
        t_rise_d=t_rise,
        decline_mag_per_d=decline,
        peak_mag=bands(peak_r, sn_g_r),
        no_flux_before_mjd=t_exp - config.baseline_margin_fraction * span,
    )


# --- rendering -------------------------------------------------------------------


@dataclass(frozen=True)
class GalaxiesOnQuadrant:
    """Host galaxies whose light reaches one quadrant (data-section pixels)."""

    x: np.ndarray  # (n,) centre, 0-based data-section column
    y: np.ndarray  # (n,)
    flux_e: np.ndarray  # (n,) electrons collected (before QE/vignetting/starflat)
    r_eff_px: np.ndarray  # (n,) nominal pixels on the sky
    sersic_n: np.ndarray  # (n,)
    axis_ratio: np.ndarray  # (n,)
    pa_deg: np.ndarray  # (n,)
    reach_px: np.ndarray  # (n,) light is rendered within this radius of the centre


def galaxy_reach_px(r_eff_px: np.ndarray, psf_half_px: int) -> np.ndarray:
    """Radius within which a host's light is rendered: 8 half-light radii (the
    profile is truncated there) plus the PSF stamp, at most 64 px."""
    return np.minimum(8.0 * np.asarray(r_eff_px) + psf_half_px, 64.0)


def galaxy_profile(
    dx: np.ndarray,
    dy: np.ndarray,
    jac: np.ndarray,
    *,
    r_eff_px: float,
    sersic_n: float,
    axis_ratio: float,
    pa_deg: float,
    psf: np.ndarray,
    psf_step_px: float,
) -> np.ndarray:
    """A PSF-convolved Sersic galaxy of unit flux sampled at pixel offsets.

    The profile is drawn on the sky (nominal pixels) on a grid of
    ``psf_step_px``, truncated at 8 half-light radii and normalised there,
    convolved with ``psf`` (the PSF on the same grid, sum 1), interpolated at
    the sky offsets ``jac @ (dx, dy)`` of the pixel centres, and multiplied by
    the pixels' solid angle ``det jac``: pixels collect surface brightness.

    Parameters
    ----------
    dx, dy : ndarray, pixels
        Offsets of pixel centres from the galaxy centre (any shape, the same).
    jac : ndarray, shape (2, 2)
        Pixel offsets -> nominal-pixel offsets on the sky, at the galaxy.
    psf : ndarray, shape (m, m), odd m
        PSF on the fine grid, centred, sum 1.

    Returns
    -------
    ndarray, same shape as ``dx``: electrons per unit flux.
    """
    step = float(psf_step_px)
    reach = 8.0 * r_eff_px + step * (psf.shape[0] // 2)
    half = int(np.ceil(reach / step))
    s = np.arange(-half, half + 1) * step
    xs, ys = np.meshgrid(s, s)
    c, si = math.cos(math.radians(pa_deg)), math.sin(math.radians(pa_deg))
    major = xs * c + ys * si
    minor = -xs * si + ys * c
    r_ell = np.hypot(major, minor / axis_ratio)
    b = float(sersic_b(sersic_n))
    prof = np.exp(-b * ((r_ell / r_eff_px) ** (1.0 / sersic_n) - 1.0))
    prof[r_ell > 8.0 * r_eff_px] = 0.0
    prof /= prof.sum() * step * step  # density per nominal px^2, unit flux
    # FFT round-off leaves ~1e-18 of either sign where there is no light.
    conv = np.clip(signal.fftconvolve(prof, psf, mode="same"), 0.0, None)
    su = jac[0, 0] * dx + jac[0, 1] * dy
    sv = jac[1, 0] * dx + jac[1, 1] * dy
    coords = np.stack([(np.ravel(sv) + half * step) / step, (np.ravel(su) + half * step) / step])
    values = ndimage.map_coordinates(conv, coords, order=1, cval=0.0).reshape(np.shape(dx))
    return values * abs(float(np.linalg.det(jac)))


def add_galaxies(
    image: np.ndarray,
    galaxies: GalaxiesOnQuadrant,
    jac: np.ndarray,
    *,
    psf: list[np.ndarray],
    psf_step_px: float,
) -> None:
    """Add host-galaxy light (electrons, before per-pixel response) into ``image``.

    ``jac`` (n, 2, 2) and ``psf`` (one fine-grid PSF per galaxy) are evaluated
    at each galaxy's centre.
    """
    ny, nx = image.shape
    for k in range(len(galaxies.x)):
        x0, y0, r = galaxies.x[k], galaxies.y[k], galaxies.reach_px[k]
        xa, xb = max(0, int(np.floor(x0 - r))), min(nx, int(np.ceil(x0 + r)) + 1)
        ya, yb = max(0, int(np.floor(y0 - r))), min(ny, int(np.ceil(y0 + r)) + 1)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb]
        image[ya:yb, xa:xb] += galaxies.flux_e[k] * galaxy_profile(
            xx - x0,
            yy - y0,
            jac[k],
            r_eff_px=float(galaxies.r_eff_px[k]),
            sersic_n=float(galaxies.sersic_n[k]),
            axis_ratio=float(galaxies.axis_ratio[k]),
            pa_deg=float(galaxies.pa_deg[k]),
            psf=psf[k],
            psf_step_px=psf_step_px,
        )


# --- a field observed many times, for the scene model's tests and benchmark ---------


@dataclass(frozen=True)
class SceneEpochsConfig:
    """Dithered images of one transient in its host, with isolated stars around,
    already reduced (electrons, sky included): what the lightcurves stage cuts
    from the survey's quadrants, without the survey. The reference frame is the
    sky in nominal pixels, centred on the transient.
    """

    n_epochs: int = 30
    shape: tuple[int, int] = (96, 96)
    """Image size (ny, nx)."""
    sky_e: float = 900.0
    read_noise_e: float = 8.0
    zp_mag: float = 28.3
    """Magnitude giving 1 e- in an image at unit transparency (``alpha = 10**(0.4
    (zp_mag - 31.4))`` e- per nJy)."""
    transparency_mag: tuple[float, float] = (0.0, 0.3)
    """Per-epoch extinction (uniform): alpha varies; known to the fit, like
    ubercal's zero points."""
    fwhm_px: tuple[float, float] = (1.8, 3.2)
    psf: str = "moffat"
    moffat_beta: float = 3.5
    dither_px: float = 8.0
    """Image centre offsets from the transient, uniform in +-dither on each axis."""
    rotation_deg: float = 1.0
    """Rotation of each image's pixel grid (uniform in +-), and scale changes of
    +-0.5 %: what different quadrants and distortion make."""
    n_stars: int = 14
    star_mag_range: tuple[float, float] = (16.0, 19.0)
    star_min_separation_px: float = 16.0
    host_mag: float = 18.0
    host_r_eff_px: float = 3.0
    host_sersic_n: float = 1.5
    host_axis_ratio: float = 0.7
    host_pa_deg: float = 30.0
    host_offset_px: tuple[float, float] = (1.5, -1.0)
    """Host centre relative to the transient, frame pixels."""
    peak_mag: float = 18.5
    explosion_epoch: float = 10.0
    """Epoch index (fractional) of the explosion; epochs are one day apart."""
    rise_epochs: float = 5.0
    decline_mag_per_epoch: float = 0.05
    noiseless: bool = False
    """Images without noise (the expected electrons): the model's systematic
    errors alone."""


@dataclass(frozen=True)
class SceneEpoch:
    """One image of :func:`simulate_scene_epochs`."""

    image: np.ndarray  # (ny, nx) e-, sky included
    variance: np.ndarray  # (ny, nx) e-^2 from the noisy data, as a reduction gives it
    matrix: np.ndarray  # (2, 2): image pixel = offset + matrix @ frame
    offset: np.ndarray  # (2,) image position of the transient
    alpha: float  # e- per nJy
    fwhm_px: float
    flux_njy: float  # the transient's true flux
    star_x: np.ndarray  # (n,) image positions of the isolated stars
    star_y: np.ndarray
    star_flux_njy: np.ndarray  # (n,)


def simulate_scene_epochs(config: SceneEpochsConfig, *, seed: int) -> list[SceneEpoch]:
    """Render the epochs of one transient (deterministic in ``seed``)."""
    from sim.render import StarsOnQuadrant, add_stars, fine_psf

    rng = rng_for(seed, "scene-epochs")
    ny, nx = config.shape
    # Stars on the sky (frame pixels), away from the transient and each other.
    stars: list[tuple[float, float]] = []
    reach = 0.5 * min(nx, ny) - 4.0
    for _ in range(200 * max(config.n_stars, 1)):
        if len(stars) == config.n_stars:
            break
        u, v = rng.uniform(-reach, reach, size=2)
        if math.hypot(u, v) < 4.0 * config.host_r_eff_px + 8.0:
            continue
        if all(math.hypot(u - a, v - b) >= config.star_min_separation_px for a, b in stars):
            stars.append((u, v))
    su, sv = np.array(stars).reshape(-1, 2).T
    mags = rng.uniform(*config.star_mag_range, size=len(su))
    star_njy = 10 ** (-0.4 * (mags - AB_NJY_ZERO_POINT))
    host_njy = 10 ** (-0.4 * (config.host_mag - AB_NJY_ZERO_POINT))
    peak_njy = 10 ** (-0.4 * (config.peak_mag - AB_NJY_ZERO_POINT))
    out = []
    for e in range(config.n_epochs):
        dt = e - config.explosion_epoch
        if dt <= 0:
            shape = 0.0
        elif dt < config.rise_epochs:
            shape = (dt / config.rise_epochs) ** 2
        else:
            shape = 10 ** (-0.4 * config.decline_mag_per_epoch * (dt - config.rise_epochs))
        angle = math.radians(rng.uniform(-config.rotation_deg, config.rotation_deg))
        scale = 1.0 + rng.uniform(-0.005, 0.005)
        c, s = math.cos(angle), math.sin(angle)
        matrix = scale * np.array([[c, -s], [s, c]])
        offset = np.array(
            [
                (nx - 1) / 2 + rng.uniform(-config.dither_px, config.dither_px),
                (ny - 1) / 2 + rng.uniform(-config.dither_px, config.dither_px),
            ]
        )
        extinction = rng.uniform(*config.transparency_mag)
        alpha = 10 ** (0.4 * (config.zp_mag - AB_NJY_ZERO_POINT - extinction))
        fwhm = float(rng.uniform(*config.fwhm_px))
        jac = np.linalg.inv(matrix)  # pixel offsets -> sky (frame) offsets
        light = np.full((ny, nx), config.sky_e)
        px = offset[0] + matrix[0, 0] * su + matrix[0, 1] * sv
        py = offset[1] + matrix[1, 0] * su + matrix[1, 1] * sv
        pts_x = np.append(px, offset[0])
        pts_y = np.append(py, offset[1])
        pts_f = np.append(star_njy, peak_njy * shape) * alpha
        keep = pts_f > 0
        n = int(keep.sum())
        add_stars(
            light,
            StarsOnQuadrant(np.flatnonzero(keep), pts_x[keep], pts_y[keep], pts_f[keep]),
            np.broadcast_to(jac, (n, 2, 2)),
            fwhm_px=np.full(n, fwhm),
            kind=config.psf,
            beta=config.moffat_beta,
        )
        hu, hv = config.host_offset_px
        hx = offset[0] + matrix[0, 0] * hu + matrix[0, 1] * hv
        hy = offset[1] + matrix[1, 0] * hu + matrix[1, 1] * hv
        add_galaxies(
            light,
            GalaxiesOnQuadrant(
                x=np.array([hx]),
                y=np.array([hy]),
                flux_e=np.array([host_njy * alpha]),
                r_eff_px=np.array([config.host_r_eff_px]),
                sersic_n=np.array([config.host_sersic_n]),
                axis_ratio=np.array([config.host_axis_ratio]),
                pa_deg=np.array([config.host_pa_deg]),
                reach_px=galaxy_reach_px(np.array([config.host_r_eff_px]), 12),
            ),
            jac[None],
            psf=[fine_psf(fwhm, 0.25, kind=config.psf, beta=config.moffat_beta)],
            psf_step_px=0.25,
        )
        if config.noiseless:
            image = light
        else:
            image = rng.poisson(light).astype(np.float64)
            image += rng.normal(0.0, config.read_noise_e, light.shape)
        out.append(
            SceneEpoch(
                image=image,
                variance=np.clip(image, 0.0, None) + config.read_noise_e**2,
                matrix=matrix,
                offset=offset,
                alpha=float(alpha),
                fwhm_px=fwhm,
                flux_njy=float(peak_njy * shape),
                star_x=px,
                star_y=py,
                star_flux_njy=star_njy,
            )
        )
    return out
