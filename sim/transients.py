"""Reference/new pairs of reduced quadrants with injected transients (seed 002).

A pair is two exposures of the same pointing, already reduced and registered:
float images in electrons with the sky still in them, photon and read noise, and
a Moffat PSF whose width differs between the two (the reference usually has the
better seeing). Between the two epochs some sources change:

- ``new``: a point source that is absent from the reference;
- ``brighten``: a star that is brighter in the new image;
- ``fade``: a star that is fainter in the new image.

The size of the change is drawn as a signal-to-noise ratio (log-uniform in
``snr_range``), so that the whole range from barely detectable to obvious is
sampled whatever the sky level; a fraction of the transients sit near the edge of
the quadrant and a fraction next to a bright star. Everything is a deterministic
function of the configuration and the seed.

:func:`make_cutouts` cuts 64x64 pair stamps around the transients (randomly
offset from the centre) and from transient-free places, with the transient's
position in cutout pixels as the label: the training set of :mod:`ml.transients`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sim._random import rng_for
from sim.catalog import _draw_magnitudes
from sim.render import StarsOnQuadrant, add_stars, psf_stamps

TransientKind = Literal["new", "brighten", "fade"]
KINDS: tuple[TransientKind, ...] = ("new", "brighten", "fade")

# A cutout holds one transient at most when transients are this far apart:
# the diagonal of a 64x64 box.
_ONE_PER_CUTOUT_PX = 91.0


@dataclass(frozen=True)
class PairConfig:
    """What a simulated reference/new pair looks like.

    The defaults follow the ``ztf`` preset's r band in a 30 s exposure: zero point
    28.3 mag (1 e- per exposure), sky 20.5 mag/arcsec^2 at 1"/px, read noise 8 e-.
    """

    nx: int = 1024
    """Columns of the quadrant."""
    ny: int = 1024
    """Rows of the quadrant."""
    stars_per_mpix: float = 320.0
    """Static stars per million pixels (3000 per ZTF quadrant)."""
    mag_range: tuple[float, float] = (14.5, 22.0)
    """Magnitudes of the static stars; the bright end stays below saturation."""
    zp_mag: float = 28.3
    """Magnitude that gives 1 e- in the exposure, in both images."""
    sky_e: float = 1300.0
    """Sky per pixel, electrons."""
    read_noise_e: float = 8.0
    """Read noise per pixel, electrons."""
    fwhm_ref_px: tuple[float, float] = (1.6, 2.4)
    """Range of the reference image's PSF FWHM, pixels."""
    fwhm_new_px: tuple[float, float] = (1.8, 3.4)
    """Range of the new image's PSF FWHM, pixels."""
    moffat_beta: float = 3.5
    """Moffat exponent of both PSFs."""
    transients_per_mpix: float = 40.0
    """Transients drawn per million pixels (fewer are placed when the separation
    rule leaves no room)."""
    kind_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    """Probabilities of ``new``, ``brighten`` and ``fade``."""
    snr_range: tuple[float, float] = (3.0, 100.0)
    """Range of the transients' signal-to-noise ratio (log-uniform); see
    :func:`flux_for_snr`."""
    delta_mag_range: tuple[float, float] = (0.2, 3.0)
    """Range of the absolute magnitude change of brightening and fading stars."""
    near_edge_fraction: float = 0.1
    """Fraction of transients within ``edge_px`` of the quadrant's border."""
    edge_px: float = 6.0
    """What 'near the edge' means, pixels."""
    near_bright_fraction: float = 0.15
    """Fraction of transients next to a bright star."""
    near_bright_px: tuple[float, float] = (3.0, 8.0)
    """Range of distances to the bright star, pixels."""
    bright_mag: float = 16.5
    """Stars brighter than this count as bright."""
    min_separation_px: float = _ONE_PER_CUTOUT_PX
    """Smallest distance between two transients; the default keeps one transient
    per 64x64 cutout, so that a cutout's label is unambiguous."""

    def __post_init__(self) -> None:
        if self.nx < 64 or self.ny < 64:
            raise ValueError(f"nx and ny must be >= 64 (a cutout), got {self.nx}x{self.ny}")
        for name in ("fwhm_ref_px", "fwhm_new_px", "snr_range", "delta_mag_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")
        if not np.isclose(sum(self.kind_weights), 1.0):
            raise ValueError(f"kind_weights must sum to 1, got {self.kind_weights}")


@dataclass(frozen=True)
class TransientTruth:
    """The injected transients of one pair, one entry per transient.

    Magnitudes use the pair's zero point (``m = -2.5 log10(flux_e) + zp_mag``).
    """

    x: np.ndarray
    """(n,) column, pixels (0-based, pixel centres at integers)."""
    y: np.ndarray
    """(n,) row, pixels."""
    kind: np.ndarray
    """(n,) str: ``new``, ``brighten`` or ``fade``."""
    mag_ref: np.ndarray
    """(n,) magnitude in the reference; NaN for new sources."""
    mag_new: np.ndarray
    """(n,) magnitude in the new image."""
    delta_mag: np.ndarray
    """(n,) ``mag_new - mag_ref`` (negative when brightening); NaN for new sources."""
    flux_change_e: np.ndarray
    """(n,) new minus reference flux, electrons."""
    mag_change: np.ndarray
    """(n,) magnitude of ``|flux_change_e|``: what a difference image shows."""
    snr: np.ndarray
    """(n,) signal-to-noise ratio of the change (:func:`flux_for_snr`)."""
    near_edge: np.ndarray
    """(n,) bool: placed within ``edge_px`` of the border."""
    near_bright: np.ndarray
    """(n,) bool: placed next to a bright star."""

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ImagePair:
    """A reference/new pair of reduced, registered quadrants and its truth."""

    ref: np.ndarray
    """(ny, nx) float32, electrons, sky included."""
    new: np.ndarray
    """(ny, nx) float32, electrons, sky included."""
    fwhm_ref_px: float
    fwhm_new_px: float
    truth: TransientTruth
    star_xy: np.ndarray
    """(n, 2) positions of the static stars (transient hosts excluded), pixels."""
    star_mag: np.ndarray
    """(n,) their magnitudes."""
    config: PairConfig


def psf_sum_sq(fwhm_px: float, beta: float) -> float:
    """Sum of the squared normalised Moffat PSF, 1/px: the effective-area term of
    optimal PSF photometry (``1 / sum P^2`` is the noise-equivalent area)."""
    h = int(np.ceil(6 * fwhm_px))
    offs = np.arange(-h, h + 1, dtype=np.float64)
    stamp = psf_stamps(
        offs[None, None, :],
        offs[None, :, None],
        np.eye(2)[None],
        fwhm_px=fwhm_px,
        kind="moffat",
        beta=beta,
    )
    return float(np.sum(stamp**2))


def flux_for_snr(snr: np.ndarray, fwhm_px: float, config: PairConfig) -> np.ndarray:
    """Flux change (e-) that has signal-to-noise ``snr`` in a difference image.

    The definition is the background-limited optimal (PSF-weighted) one for a
    point source with the new image's PSF on the unmatched difference of two
    images with the same sky: ``snr = dF sqrt(sum P^2) / sqrt(2 (sky + rn^2))``.
    A PSF-matched difference is a little noisier (the broader PSF) and a
    detection near a star has the star's photon noise on top.
    """
    sigma_diff = np.sqrt(2.0 * (config.sky_e + config.read_noise_e**2))
    return np.asarray(snr) * sigma_diff / np.sqrt(psf_sum_sq(fwhm_px, config.moffat_beta))


def _static_stars(
    rng: np.random.Generator, config: PairConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = rng.poisson(config.stars_per_mpix * config.nx * config.ny / 1e6)
    x = rng.uniform(-0.5, config.nx - 0.5, size=n)
    y = rng.uniform(-0.5, config.ny - 0.5, size=n)
    mag = _draw_magnitudes(rng, n, *config.mag_range)
    return x, y, mag


def _place(
    rng: np.random.Generator,
    config: PairConfig,
    placed: list[tuple[float, float]],
    bright_xy: np.ndarray,
) -> tuple[float, float, bool, bool] | None:
    """One transient position that keeps ``min_separation_px`` from the others;
    None when 200 tries found no room."""
    nx, ny, e = config.nx, config.ny, config.edge_px
    for _ in range(200):
        u = rng.uniform()
        near_edge = near_bright = False
        if u < config.near_edge_fraction:
            # One coordinate within e of a border, the other anywhere.
            along = rng.uniform(-0.5, [nx - 0.5, ny - 0.5])
            side = rng.integers(4)
            depth = rng.uniform(0.0, e)
            x, y = along
            if side == 0:
                x = depth
            elif side == 1:
                x = nx - 1 - depth
            elif side == 2:
                y = depth
            else:
                y = ny - 1 - depth
            near_edge = True
        elif u < config.near_edge_fraction + config.near_bright_fraction and len(bright_xy):
            bx, by = bright_xy[rng.integers(len(bright_xy))]
            r = rng.uniform(*config.near_bright_px)
            a = rng.uniform(0, 2 * np.pi)
            x, y = bx + r * np.cos(a), by + r * np.sin(a)
            near_bright = True
        else:
            x, y = rng.uniform(-0.5, nx - 0.5), rng.uniform(-0.5, ny - 0.5)
        if not (0 <= x <= nx - 1 and 0 <= y <= ny - 1):
            continue
        if all((x - px) ** 2 + (y - py) ** 2 >= config.min_separation_px**2 for px, py in placed):
            return float(x), float(y), near_edge, near_bright
    return None


def _draw_transients(
    rng: np.random.Generator, config: PairConfig, fwhm_new: float, bright_xy: np.ndarray
) -> TransientTruth:
    n_try = rng.poisson(config.transients_per_mpix * config.nx * config.ny / 1e6)
    placed: list[tuple[float, float]] = []
    flags: list[tuple[bool, bool]] = []
    for _ in range(n_try):
        spot = _place(rng, config, placed, bright_xy)
        if spot is not None:
            placed.append(spot[:2])
            flags.append(spot[2:])
    n = len(placed)
    xy = np.array(placed, dtype=np.float64).reshape(n, 2)
    kind = np.array(KINDS)[rng.choice(3, size=n, p=config.kind_weights)]
    lo, hi = np.log(config.snr_range)
    snr = np.exp(rng.uniform(lo, hi, size=n))
    dflux = flux_for_snr(snr, fwhm_new, config)
    dmag_abs = rng.uniform(*config.delta_mag_range, size=n)
    ratio = 10 ** (0.4 * dmag_abs)  # > 1: bright epoch over faint epoch
    # The host's reference flux follows from the change and its size in magnitudes.
    flux_ref = np.where(
        kind == "new",
        0.0,
        np.where(kind == "brighten", dflux / (ratio - 1.0), dflux * ratio / (ratio - 1.0)),
    )
    sign = np.where(kind == "fade", -1.0, 1.0)
    flux_new = flux_ref + sign * dflux
    with np.errstate(divide="ignore"):
        mag_ref = np.where(kind == "new", np.nan, -2.5 * np.log10(flux_ref) + config.zp_mag)
    mag_new = -2.5 * np.log10(flux_new) + config.zp_mag
    return TransientTruth(
        x=xy[:, 0],
        y=xy[:, 1],
        kind=kind,
        mag_ref=mag_ref,
        mag_new=mag_new,
        delta_mag=mag_new - mag_ref,
        flux_change_e=sign * dflux,
        mag_change=-2.5 * np.log10(dflux) + config.zp_mag,
        snr=snr,
        near_edge=np.array([f[0] for f in flags], dtype=bool),
        near_bright=np.array([f[1] for f in flags], dtype=bool),
    )


def _render(
    rng: np.random.Generator,
    config: PairConfig,
    x: np.ndarray,
    y: np.ndarray,
    flux_e: np.ndarray,
    fwhm_px: float,
) -> np.ndarray:
    light = np.full((config.ny, config.nx), config.sky_e)
    keep = flux_e > 0
    stars = StarsOnQuadrant(index=np.flatnonzero(keep), x=x[keep], y=y[keep], flux_e=flux_e[keep])
    n = len(stars.x)
    add_stars(
        light,
        stars,
        np.broadcast_to(np.eye(2), (n, 2, 2)),
        fwhm_px=np.full(n, fwhm_px),
        kind="moffat",
        beta=config.moffat_beta,
    )
    image = rng.poisson(light).astype(np.float64)
    image += rng.normal(0.0, config.read_noise_e, size=image.shape)
    return image.astype(np.float32)


def simulate_pair(config: PairConfig, *, seed: int) -> ImagePair:
    """A reference/new pair of one pointing with injected transients.

    Parameters
    ----------
    config : PairConfig
    seed : int
        The same seed and configuration give the same pair.

    Returns
    -------
    ImagePair
    """
    rng = rng_for(seed, "transient-pair")
    fwhm_ref = float(rng.uniform(*config.fwhm_ref_px))
    fwhm_new = float(rng.uniform(*config.fwhm_new_px))
    sx, sy, smag = _static_stars(rng, config)
    bright = smag < config.bright_mag
    if config.near_bright_fraction > 0 and not bright.any():
        # Small quadrants may lack a bright star: add one so the case is sampled.
        sx = np.append(sx, rng.uniform(8, config.nx - 9))
        sy = np.append(sy, rng.uniform(8, config.ny - 9))
        smag = np.append(smag, rng.uniform(config.mag_range[0], config.bright_mag))
        bright = np.append(bright, True)
    truth = _draw_transients(rng, config, fwhm_new, np.column_stack([sx, sy])[bright])
    static_flux = 10 ** (-0.4 * (smag - config.zp_mag))
    with np.errstate(invalid="ignore"):
        flux_ref = np.nan_to_num(10 ** (-0.4 * (truth.mag_ref - config.zp_mag)))
    flux_new = 10 ** (-0.4 * (truth.mag_new - config.zp_mag))
    x = np.concatenate([sx, truth.x])
    y = np.concatenate([sy, truth.y])
    ref = _render(rng, config, x, y, np.concatenate([static_flux, flux_ref]), fwhm_ref)
    new = _render(rng, config, x, y, np.concatenate([static_flux, flux_new]), fwhm_new)
    return ImagePair(
        ref=ref,
        new=new,
        fwhm_ref_px=fwhm_ref,
        fwhm_new_px=fwhm_new,
        truth=truth,
        star_xy=np.column_stack([sx, sy]),
        star_mag=smag,
        config=config,
    )


@dataclass(frozen=True)
class Cutouts:
    """Pair cutouts with the transient's position as the label."""

    images: np.ndarray
    """(n, 2, size, size) float32, electrons: reference then new."""
    xy: np.ndarray
    """(n, 2) transient (x, y) in cutout pixels; NaN where there is none."""
    present: np.ndarray
    """(n,) bool: the cutout holds a transient."""
    truth_index: np.ndarray
    """(n,) row of the pair's truth table; -1 where there is no transient."""
    origin: np.ndarray
    """(n, 2) (x0, y0) of the cutout's first pixel in the quadrant."""
    snr: np.ndarray
    """(n,) signal-to-noise ratio of the transient; NaN where there is none."""

    def __len__(self) -> int:
        return len(self.present)


def make_cutouts(
    pair: ImagePair,
    *,
    size: int = 64,
    max_offset_px: float = 24.0,
    negatives_per_transient: float = 0.5,
    seed: int,
) -> Cutouts:
    """Cutouts around each transient, offset randomly from the centre, plus
    cutouts without any transient.

    A transient near the quadrant's edge stays near the cutout's edge: cutouts
    never leave the quadrant.

    Parameters
    ----------
    pair : ImagePair
    size : int
        Cutout side, pixels.
    max_offset_px : float
        The transient sits within this distance of the cutout's centre on each
        axis (before clipping to the quadrant).
    negatives_per_transient : float
        Transient-free cutouts per transient (their positions are drawn at
        random and kept when no transient lies within 2 px of the cutout).
    seed : int

    Returns
    -------
    Cutouts
    """
    ny, nx = pair.ref.shape
    if not 8 <= size <= min(nx, ny):
        raise ValueError(f"size must be between 8 and the image size {min(nx, ny)}, got {size}")
    if not 0 <= max_offset_px <= size / 2:
        raise ValueError(f"max_offset_px must be in [0, size/2], got {max_offset_px}")
    rng = rng_for(seed, "transient-cutouts")
    truth = pair.truth
    centre = (size - 1) / 2.0
    off = rng.uniform(-max_offset_px, max_offset_px, size=(len(truth), 2))
    x0 = np.clip(np.rint(truth.x - centre - off[:, 0]), 0, nx - size).astype(np.int64)
    y0 = np.clip(np.rint(truth.y - centre - off[:, 1]), 0, ny - size).astype(np.int64)
    n_neg = round(negatives_per_transient * len(truth))
    neg: list[tuple[int, int]] = []
    for _ in range(50 * n_neg):
        if len(neg) == n_neg:
            break
        cx, cy = int(rng.integers(0, nx - size + 1)), int(rng.integers(0, ny - size + 1))
        inside = (
            (truth.x > cx - 2)
            & (truth.x < cx + size + 1)
            & (truth.y > cy - 2)
            & (truth.y < cy + size + 1)
        )
        if not inside.any():
            neg.append((cx, cy))
    neg_xy = np.array(neg, dtype=np.int64).reshape(-1, 2)
    origin = np.concatenate([np.column_stack([x0, y0]), neg_xy])
    images = np.stack(
        [
            np.stack([img[b : b + size, a : a + size] for img in (pair.ref, pair.new)])
            for a, b in origin
        ]
    ).astype(np.float32)
    label = np.column_stack([truth.x - x0, truth.y - y0])
    return Cutouts(
        images=images.reshape(-1, 2, size, size),
        xy=np.concatenate([label, np.full((len(neg_xy), 2), np.nan)]),
        present=np.concatenate([np.ones(len(truth), bool), np.zeros(len(neg_xy), bool)]),
        truth_index=np.concatenate([np.arange(len(truth)), np.full(len(neg_xy), -1)]),
        origin=origin,
        snr=np.concatenate([truth.snr, np.full(len(neg_xy), np.nan)]),
    )


def simulate_cutouts(config: PairConfig, seeds: Iterable[int], **options: Any) -> Cutouts:
    """Cutouts of many simulated pairs, one pair per seed, concatenated (a
    training or test set); ``options`` go to :func:`make_cutouts`.
    ``truth_index`` then refers to each cutout's own pair."""
    parts = [make_cutouts(simulate_pair(config, seed=s), seed=s, **options) for s in seeds]
    if not parts:
        raise ValueError("seeds is empty")
    return Cutouts(
        **{
            f.name: np.concatenate([getattr(c, f.name) for c in parts])
            for f in dataclasses.fields(Cutouts)
        }
    )
