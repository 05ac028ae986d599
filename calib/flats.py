"""Master flats of one quadrant from dome-flat stacks (seed 004), read in row bands.

Each frame is overscan- and bias-subtracted, multiplied by the quadrant's gain and
divided by its focal-plane level (one constant per exposure: the LED's
brightness, :func:`frame_level`), so quadrant gain and QE differences stay in the
flat. Frames are combined per LED (:func:`calib.masters.combine_bands`), the LED
masters averaged (their colour terms cancel), dead pixels found, and the daily
flat / master flat ratio and the per-pixel residual scatter of every LED's stack
measured. The focal-plane normalisation (mean 1 over the good pixels of every
quadrant, :func:`focal_plane_normalisation`) needs all quadrants and is applied
after.

Every statistic but the ratio and scatter summaries is per pixel, so the stack is
read ``rows_per_band`` rows at a time and never held whole; the summaries need
whole-quadrant maps, which are one float32 image per LED and night.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from calib.bits import MASK_DEAD, MASK_HOT
from calib.masters import (
    BandCombiner,
    CombineMode,
    MasterFrame,
    RowReader,
    find_dead_pixels,
    flat_ratio,
    flat_residual_sigma,
    ratio_statistics,
)

__all__ = [
    "RATIO_EDGES",
    "FlatQuadrant",
    "LedStack",
    "build_flat_quadrant",
    "focal_plane_normalisation",
    "frame_level",
]

RATIO_EDGES = np.linspace(0.97, 1.03, 121)
"""Bins of the daily / master flat ratio histograms (0.05 % wide; values beyond
+-3 %, tens of photon-noise sigmas at dome-flat levels, land in the end bins)."""


@dataclass(frozen=True, eq=False)
class LedStack:
    """The flat frames of one LED on one quadrant, in time order.

    Attributes
    ----------
    read : callable
        ``read(r0, r1)``: rows ``r0:r1`` of every frame, overscan-subtracted, ADU,
        float32, shape (n_frames, r1 - r0, nx).
    levels_e : ndarray, shape (n_frames,), e-
        Each frame's focal-plane level (:func:`frame_level` averaged over quadrants).
    nights : ndarray of int, shape (n_frames,)
        Index of each frame's night among the period's nights.
    """

    read: RowReader
    levels_e: np.ndarray
    nights: np.ndarray

    def __len__(self) -> int:
        return len(self.levels_e)


@dataclass(frozen=True, eq=False)
class FlatQuadrant:
    """The un-normalised master flat of one quadrant and its stability numbers.

    Attributes
    ----------
    flat, uncertainty : ndarray, shape (ny, nx), float32
        In units of the frames' focal-plane levels: divide by
        :func:`focal_plane_normalisation` for the published flat.
    nframes : ndarray, shape (ny, nx), int16
    defects : ndarray, shape (ny, nx), uint8
        ``MASK_HOT`` (from the bias) | ``MASK_DEAD``.
    residual_sigma : ndarray, shape (ny, nx), float32
        Per-pixel sigma_i of the LED stacks, averaged over LEDs (NaN with one
        frame per LED).
    ratio_median, ratio_rms, ratio_outlier_fraction : ndarray, shape (n_leds, n_nights)
        Daily / master flat per LED and night (NaN where the LED has no frame).
    ratio_hist : ndarray, shape (n_leds, n_nights, len(RATIO_EDGES) - 1), int64
    residual_sigma_median : ndarray, shape (n_leds,)
    n_dead : int
    good_sum : float
        Sum of ``flat`` over its good pixels (no defect, finite).
    good_count : int
    """

    flat: np.ndarray
    uncertainty: np.ndarray
    nframes: np.ndarray
    defects: np.ndarray
    residual_sigma: np.ndarray
    ratio_median: np.ndarray
    ratio_rms: np.ndarray
    ratio_outlier_fraction: np.ndarray
    ratio_hist: np.ndarray
    residual_sigma_median: np.ndarray
    n_dead: int
    good_sum: float
    good_count: int


def frame_level(electrons: np.ndarray) -> float:
    """A flat frame's level on one quadrant: the median electrons (NaN ignored)."""
    return float(np.nanmedian(electrons))


def focal_plane_normalisation(sums: Iterable[tuple[float, int]]) -> float:
    """Mean of the un-normalised flat over the good pixels of every quadrant, from
    each quadrant's ``(good_sum, good_count)``."""
    pairs = list(sums)
    count = sum(c for _, c in pairs)
    if count == 0:
        raise ValueError("no good flat pixel on any quadrant: cannot normalise")
    return sum(s for s, _ in pairs) / count


def build_flat_quadrant(
    leds: Sequence[LedStack],
    *,
    bias_adu: np.ndarray,
    hot: np.ndarray,
    gain: float,
    n_nights: int,
    rows_per_band: int,
    mode: CombineMode = "ccdproc",
    low_sigma: float = 3.0,
    high_sigma: float = 3.0,
    iterations: int = 3,
    dead_min_response: float = 0.7,
) -> FlatQuadrant:
    """Master flat of one quadrant from its LED stacks.

    Parameters
    ----------
    leds : sequence of LedStack
        One per LED, at least one frame each.
    bias_adu : ndarray, shape (ny, nx), ADU
        The period's master bias (overscan-subtracted).
    hot : ndarray of bool, shape (ny, nx)
        Hot pixels of that bias (left out of the stability numbers).
    gain : float
        e-/ADU.
    n_nights : int
        Nights of the period (``LedStack.nights`` index them).
    rows_per_band : int
        Rows of each stack read at once (:func:`calib.masters.rows_per_band`).
    mode, low_sigma, high_sigma, iterations
        Combination of each LED's stack (:func:`calib.masters.combine_frames`).
    dead_min_response : float
        :func:`calib.masters.find_dead_pixels` threshold.

    Returns
    -------
    FlatQuadrant
    """
    if not leds or any(len(led) == 0 for led in leds):
        raise ValueError("leds must be a non-empty sequence of LED stacks with frames")
    bias_adu = np.asarray(bias_adu)
    hot = np.asarray(hot, bool)
    if hot.shape != bias_adu.shape or bias_adu.ndim != 2:
        raise ValueError(f"bias_adu {bias_adu.shape} and hot {hot.shape} must be one 2-D shape")
    if not gain > 0:
        raise ValueError(f"gain must be > 0 e-/ADU, got {gain}")
    combine = {"mode": mode, "low_sigma": low_sigma, "high_sigma": high_sigma}
    combine["iterations"] = iterations
    n_leds = len(leds)
    ratio = np.full((3, n_leds, n_nights), np.nan)
    ratio_hist = np.zeros((n_leds, n_nights, len(RATIO_EDGES) - 1), dtype=np.int64)
    resid_median = np.full(n_leds, np.nan)
    masters: list[MasterFrame] = []
    resid_maps: list[np.ndarray] = []
    for j, led in enumerate(leds):
        master, sigma_i, ratios = _led_master(
            led, bias_adu, gain, rows_per_band=rows_per_band, **combine
        )
        masters.append(master)
        if sigma_i is not None:
            resid_maps.append(sigma_i)
            resid_median[j] = float(np.nanmedian(sigma_i[~hot]))
        for night, (pixel_ratio, n_night) in ratios.items():
            # Photon noise from the measured electrons: a per-pixel std of a
            # handful of frames is far too noisy to judge 5-sigma outliers by.
            level_e = np.mean(led.levels_e[led.nights == night].tolist())
            frame_noise = 1.0 / np.sqrt(np.clip(level_e * master.center, 1.0, None))
            expected = frame_noise * np.sqrt(1.0 / n_night + 1.0 / len(led))
            st = ratio_statistics(
                pixel_ratio, expected_sigma=np.where(expected > 0, expected, np.inf), good=~hot
            )
            ratio[:, j, night] = (st.median, st.robust_rms, st.outlier_fraction)
            r = pixel_ratio[~hot & np.isfinite(pixel_ratio)]
            ratio_hist[j, night] = np.histogram(
                np.clip(r, RATIO_EDGES[0], RATIO_EDGES[-1]), bins=RATIO_EDGES
            )[0]
    center = np.nanmean([m.center for m in masters], axis=0)
    unc = np.sqrt(np.nansum([m.uncertainty**2 for m in masters], axis=0)) / len(masters)
    nfr = np.sum([m.nframes for m in masters], axis=0).astype(np.int16)
    level = np.nanmedian(center[~hot])
    dead = find_dead_pixels(center / level, min_response=dead_min_response)
    defects = (hot.astype(np.uint8) * MASK_HOT) | (dead.astype(np.uint8) * MASK_DEAD)
    good = (defects == 0) & np.isfinite(center)
    resid = np.mean(resid_maps, axis=0) if resid_maps else np.full(center.shape, np.nan)
    return FlatQuadrant(
        flat=center.astype(np.float32),
        uncertainty=unc.astype(np.float32),
        nframes=nfr,
        defects=defects,
        residual_sigma=resid.astype(np.float32),
        ratio_median=ratio[0],
        ratio_rms=ratio[1],
        ratio_outlier_fraction=ratio[2],
        ratio_hist=ratio_hist,
        residual_sigma_median=resid_median,
        n_dead=int(dead.sum()),
        good_sum=float(center[good].sum(dtype=np.float64)),
        good_count=int(good.sum()),
    )


def _led_master(
    led: LedStack,
    bias_adu: np.ndarray,
    gain: float,
    *,
    rows_per_band: int,
    **combine,
) -> tuple[MasterFrame, np.ndarray | None, dict[int, tuple[np.ndarray, int]]]:
    """One LED: its master, its residual-scatter map (None for a single frame),
    and per night the daily / master ratio map and the night's frame count."""
    n = len(led)
    ny, nx = bias_adu.shape
    levels = [float(v) for v in led.levels_e]
    nights = {int(k): np.flatnonzero(led.nights == k) for k in dict.fromkeys(led.nights.tolist())}
    combiner = BandCombiner(n, (ny, nx), **combine)
    sigma_i = np.empty((ny, nx), np.float32) if n > 1 else None
    ratios = {k: np.empty((ny, nx), np.float32) for k in nights}
    for r0 in range(0, ny, rows_per_band):
        r1 = min(ny, r0 + rows_per_band)
        band = np.asarray(led.read(r0, r1))  # (n, rows, nx) ADU
        norm = np.empty(band.shape, np.float32)
        for k in range(n):
            norm[k] = (band[k] - bias_adu[r0:r1]) * gain / levels[k]
        del band
        combiner.add(norm, r0)
        if sigma_i is not None:
            sigma_i[r0:r1] = flat_residual_sigma(norm)
        for night, ks in nights.items():
            # A night's frames are consecutive (time order): a view, not a copy.
            frames = norm[ks[0] : ks[-1] + 1] if ks[-1] - ks[0] + 1 == len(ks) else norm[ks]
            ratios[night][r0:r1] = flat_ratio(frames.mean(axis=0), combiner.center[r0:r1])
    return combiner.result(), sigma_i, {k: (ratios[k], len(ks)) for k, ks in nights.items()}
