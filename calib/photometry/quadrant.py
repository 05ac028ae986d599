"""Forced aperture photometry of reference stars on one reduced quadrant: the
chain of :mod:`calib.photometry`'s pieces, in three steps: build (background on the
surface-brightness image, fluence image, the stars), measure (FWHM, centroids,
aperture sums), evaluate (flags, crowding, aperture correction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from calib.bits import (
    FLAG_CENTROID,
    FLAG_CROWDED,
    FLAG_EDGE,
    FLAG_NO_FLUX,
    FLAG_SATURATED,
)
from calib.photometry._masks import MaskIndex
from calib.photometry.apcorr import ApertureCorrection, measure_aperture_correction
from calib.photometry.apertures import aperture_sums
from calib.photometry.background import estimate_background
from calib.photometry.centroids import refine_centroids
from calib.photometry.crowding import crowding_contamination, uncatalogued_sources
from calib.photometry.fwhm import measure_fwhm
from calib.reduce import ReducedQuadrant, to_fluence

__all__ = ["QuadrantPhotometry", "photometer_quadrant"]


@dataclass(frozen=True, eq=False)
class QuadrantPhotometry:
    """Forced photometry of catalog stars on one quadrant; arrays of shape (n,).

    Attributes
    ----------
    index : ndarray, int64
        Rows of the input positions measured (centre on the quadrant).
    x, y : ndarray, float64, pixels
        Measured positions (0-based data-section pixels).
    flux_e, flux_err_e : ndarray, float64, e-
        Working-aperture sums on the fluence image, *before* the aperture
        correction (see :func:`apply_aperture_corrections`), and their errors
        (photon + read + background-level noise).
    flags : ndarray, int64
        :data:`FLAG_BITS`.
    contamination : ndarray, float64
        Estimated fraction of the aperture flux from neighbours (flag 8 above
        ``crowd_max_contamination``).
    fwhm_px : float
    aperture_radius_px : float
    aperture_correction : ApertureCorrection
        The quadrant's own estimate.
    background_e : float
        Median background, e- per nominal pixel.
    centroid_offset_px : tuple of float
        Median refined - forced position of the bright stars (dx, dy).
    n_centroided : int
        Stars whose refined centroid was used.
    """

    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux_e: np.ndarray
    flux_err_e: np.ndarray
    flags: np.ndarray
    contamination: np.ndarray
    fwhm_px: float
    aperture_radius_px: float
    aperture_correction: ApertureCorrection
    background_e: float
    centroid_offset_px: tuple[float, float]
    n_centroided: int


def photometer_quadrant(
    reduced: ReducedQuadrant,
    x: np.ndarray,
    y: np.ndarray,
    ref_mag: np.ndarray,
    *,
    fwhm_guess_px: float = 2.0,
    fwhm_px: float | None = None,
    aperture_radius_fwhm: float = 3.0,
    apcorr_radius_fwhm: float = 5.0,
    apcorr_min_snr: float = 50.0,
    apcorr_max_stars: int = 50,
    background_box_px: int = 64,
    background_filter: int = 3,
    background_estimator: Literal["mean", "median"] = "mean",
    crowd_max_contamination: float = 1e-3,
    crowd_moffat_beta: float = 3.0,
    centroid_min_snr: float = 30.0,
    max_centroid_shift_px: float = 1.0,
) -> QuadrantPhotometry:
    """Forced aperture photometry of catalog stars on one reduced quadrant.

    Parameters
    ----------
    reduced : ReducedQuadrant
        From :func:`calib.reduce.reduce_quadrant`.
    x, y : ndarray, shape (n,), pixels
        Catalog positions from the WCS (0-based data-section pixels); may include
        stars off the quadrant, which count as neighbours but are not measured.
    ref_mag : ndarray, shape (n,), mag
        Catalog magnitudes: order stars by brightness and judge crowding.
    fwhm_guess_px : float
        Starting FWHM for the fit.
    fwhm_px : float, optional
        Use this FWHM instead of measuring it.
    aperture_radius_fwhm : float
        Working aperture radius in FWHM.
    apcorr_radius_fwhm : float
        Radius of the "total" aperture the correction refers to, FWHM.
    apcorr_min_snr : float
        Minimum working-aperture S/N of an aperture-correction star.
    apcorr_max_stars : int
        Brightest qualifying stars used for the correction.
    background_box_px, background_filter : int
        See :func:`estimate_background`.
    background_estimator : {'mean', 'median'}
        See :func:`estimate_background` (``estimator``).
    crowd_max_contamination : float
        Crowding rule (flag 8): the light neighbours (catalog stars, and detected
        sources the catalog lacks) put in the aperture, as a fraction of the
        star's, estimated with a Moffat PSF of the measured FWHM, exceeds this.
    crowd_moffat_beta : float
        Moffat index of that estimate (smaller: heavier wings, more flagged).
    centroid_min_snr : float
        Stars at or above this S/N use their refined centroid.
    max_centroid_shift_px : float
        Larger refinements are rejected (flag 32) and the forced position kept.

    Returns
    -------
    QuadrantPhotometry
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ref_mag = np.asarray(ref_mag, dtype=np.float64)
    if not (x.shape == y.shape == ref_mag.shape) or x.ndim != 1:
        raise ValueError(
            f"x, y and ref_mag must be 1-D of one length, got {x.shape}, {y.shape}, {ref_mag.shape}"
        )
    if aperture_radius_fwhm <= 0 or apcorr_radius_fwhm <= aperture_radius_fwhm:
        raise ValueError(
            "need 0 < aperture_radius_fwhm < apcorr_radius_fwhm, got "
            f"{aperture_radius_fwhm} and {apcorr_radius_fwhm}"
        )
    image = _build_fluence(
        reduced, box_px=background_box_px, filter_size=background_filter,
        estimator=background_estimator,
    )  # fmt: skip
    stars = _Stars.forced(x, y, ref_mag, reduced.shape, beta=crowd_moffat_beta)
    masked = MaskIndex(reduced.mask)

    # Provisional flags at the forced positions pick the FWHM and centroid stars.
    fwhm0 = fwhm_px or fwhm_guess_px
    r_guess = aperture_radius_fwhm * fwhm0
    xs, ys = stars.xs, stars.ys
    crowded = stars.contamination(xs, ys, np.ones(len(xs)), _NO_SEGMENTS, r_guess, fwhm0) > 1e-2
    pre_flags = masked.flags(xs, ys, r_guess) | np.where(crowded, FLAG_CROWDED, 0)
    if fwhm_px is None:
        clean = (pre_flags == 0) & image.inside(xs, ys, r_guess)
        fwhm_px = measure_fwhm(image.fluence, xs[clean], ys[clean], guess_px=fwhm_guess_px)
    r_ap = aperture_radius_fwhm * fwhm_px

    centroids = _centroid(
        image, xs, ys, pre_flags, r_ap=r_ap, fwhm_px=fwhm_px,
        min_snr=centroid_min_snr, max_shift_px=max_centroid_shift_px,
    )  # fmt: skip
    px, py = centroids.x, centroids.y
    flux, flux_err = _measure(image, px, py, r_ap)
    flags, contamination, segments = _evaluate_flags(
        image, stars, masked, centroids, flux, r_ap=r_ap, fwhm_px=fwhm_px,
        max_contamination=crowd_max_contamination,
    )  # fmt: skip

    # Correction stars: clean out to the big aperture (mask bits, catalog and
    # detected neighbours), since everything in it is taken for the star's light.
    r_big = apcorr_radius_fwhm * fwhm_px
    isolated_big = stars.contamination(px, py, flux, segments, r_big, fwhm_px)
    clean_big = (
        (flags == 0)
        & (masked.flags(px, py, r_big) == 0)
        & image.inside(px, py, r_big)
        & (isolated_big <= crowd_max_contamination)
        & (flux / flux_err >= apcorr_min_snr)
    )
    apcorr = measure_aperture_correction(
        image.fluence, image.variance, px, py, flux,
        np.nonzero(clean_big)[0][:apcorr_max_stars], r_ap, r_big,
    )  # fmt: skip
    return QuadrantPhotometry(
        index=stars.index.astype(np.int64),
        x=px,
        y=py,
        flux_e=flux,
        flux_err_e=flux_err,
        flags=flags,
        contamination=contamination,
        fwhm_px=float(fwhm_px),
        aperture_radius_px=float(r_ap),
        aperture_correction=apcorr,
        background_e=image.background_e,
        centroid_offset_px=centroids.offset,
        n_centroided=int(centroids.use.sum()),
    )


# --- build: the fluence image and the stars ------------------------------------------

_NO_SEGMENTS = (np.zeros(0), np.zeros(0), np.zeros(0))


@dataclass(frozen=True, eq=False)
class _FluenceImage:
    """The background-subtracted fluence image of a quadrant and its noise."""

    fluence: np.ndarray  # (ny, nx) e-
    variance: np.ndarray  # (ny, nx) e-^2
    level_err: np.ndarray  # (ny, nx) e- per nominal pixel, error of the subtracted background
    pixel_area: np.ndarray  # (ny, nx)
    background_e: float  # median background, e- per nominal pixel
    sky_rms_e: float  # median sky rms, e- per nominal pixel

    def inside(self, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
        """Circles of radius ``r`` entirely on the image."""
        ny, nx = self.fluence.shape
        return (x - r >= -0.5) & (x + r <= nx - 0.5) & (y - r >= -0.5) & (y + r <= ny - 0.5)


def _build_fluence(
    reduced: ReducedQuadrant,
    *,
    box_px: int,
    filter_size: int,
    estimator: Literal["mean", "median"],
) -> _FluenceImage:
    """Background on surface brightness, subtracted there, then times the pixel
    area (seed 003)."""
    bkg = estimate_background(
        reduced.surface_brightness,
        mask=reduced.mask != 0,
        box_size=box_px,
        filter_size=filter_size,
        estimator=estimator,
    )
    fluence, fluence_var = to_fluence(
        reduced.surface_brightness - bkg.background, reduced.pixel_area, reduced.variance
    )
    return _FluenceImage(
        fluence=fluence,
        variance=cast(np.ndarray, fluence_var),  # given a variance, to_fluence returns one
        level_err=bkg.level_err,
        pixel_area=reduced.pixel_area,
        background_e=float(np.median(bkg.background)),
        sky_rms_e=float(np.median(bkg.rms)),
    )


@dataclass(frozen=True, eq=False)
class _Stars:
    """Every catalog star near the quadrant (neighbours) and the forced ones."""

    x: np.ndarray  # (n,) all positions, px
    y: np.ndarray
    mag: np.ndarray  # (n,) catalog magnitudes
    index: np.ndarray  # (m,) rows forced (centre on the quadrant), brightest first
    beta: float  # Moffat index of the crowding estimate

    @classmethod
    def forced(
        cls, x: np.ndarray, y: np.ndarray, mag: np.ndarray, shape: tuple[int, int], *, beta: float
    ) -> _Stars:
        ny, nx = shape
        on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5) & np.isfinite(x + y)
        index = np.nonzero(on)[0]
        index = index[np.argsort(mag[index], kind="stable")]
        return cls(x, y, mag, index, beta)

    @property
    def xs(self) -> np.ndarray:
        return self.x[self.index]

    @property
    def ys(self) -> np.ndarray:
        return self.y[self.index]

    def contamination(
        self,
        cx: np.ndarray,
        cy: np.ndarray,
        flux: np.ndarray,
        segments: tuple[np.ndarray, np.ndarray, np.ndarray],
        radius_px: float,
        fwhm_px: float,
    ) -> np.ndarray:
        """Contamination of the forced stars at ``(cx, cy)`` with fluxes ``flux``."""
        return crowding_contamination(
            cx, cy, flux, self.mag[self.index], self.index, self.x, self.y, self.mag, segments,
            radius_px=radius_px, fwhm_px=fwhm_px, beta=self.beta,
        )  # fmt: skip


# --- measure: centroids and aperture sums --------------------------------------------


@dataclass(frozen=True, eq=False)
class _Centroids:
    x: np.ndarray  # (m,) positions measured at, px
    y: np.ndarray
    offset: tuple[float, float]  # median refined - forced of the stars used, px
    bright: np.ndarray  # (m,) bool, S/N high enough to centroid
    use: np.ndarray  # (m,) bool, bright and the refinement accepted


def _centroid(
    image: _FluenceImage,
    xs: np.ndarray,
    ys: np.ndarray,
    pre_flags: np.ndarray,
    *,
    r_ap: float,
    fwhm_px: float,
    min_snr: float,
    max_shift_px: float,
) -> _Centroids:
    """Bright stars use their own centroid; the rest follow the median offset."""
    sums, sum_vars = aperture_sums(image.fluence, xs, ys, r_ap, variance=image.variance)
    snr = sums / np.sqrt(np.maximum(sum_vars, 1e-30))
    xc, yc = refine_centroids(image.fluence, xs, ys, fwhm_px=fwhm_px)
    shift = np.hypot(xc - xs, yc - ys)
    bright = (snr >= min_snr) & ((pre_flags & (FLAG_SATURATED | FLAG_CROWDED)) == 0)
    use = bright & (shift <= max_shift_px)
    if use.sum() >= 3:
        offset = (float(np.median(xc[use] - xs[use])), float(np.median(yc[use] - ys[use])))
    else:
        offset = (0.0, 0.0)
    px = np.where(use, xc, xs + offset[0])
    py = np.where(use, yc, ys + offset[1])
    return _Centroids(px, py, offset, bright, use)


def _measure(
    image: _FluenceImage, px: np.ndarray, py: np.ndarray, r_ap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Aperture fluxes and errors: photon + read noise, and the background level's."""
    ny, nx = image.fluence.shape
    flux, flux_var = aperture_sums(image.fluence, px, py, r_ap, variance=image.variance)
    area_ap = np.pi * r_ap**2
    iy = np.clip(np.rint(py), 0, ny - 1).astype(int)
    ix = np.clip(np.rint(px), 0, nx - 1).astype(int)
    # The background's error in fluence units, at the stars only.
    level = (image.level_err[iy, ix] * image.pixel_area[iy, ix]) ** 2
    return flux, np.sqrt(flux_var + area_ap**2 * level)


# --- evaluate: flags ------------------------------------------------------------------


def _evaluate_flags(
    image: _FluenceImage,
    stars: _Stars,
    masked: MaskIndex,
    centroids: _Centroids,
    flux: np.ndarray,
    *,
    r_ap: float,
    fwhm_px: float,
    max_contamination: float,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Flags, contamination and the uncatalogued sources found on the way."""
    px, py = centroids.x, centroids.y
    flags = masked.flags(px, py, r_ap)
    flags[~image.inside(px, py, r_ap)] |= FLAG_EDGE
    # Neighbours the catalog does not know (fainter than its limit) are found
    # as detected segments away from every catalog star.
    segments = uncatalogued_sources(
        image.fluence, image.sky_rms_e, stars.x, stars.y, match_px=1.5 * fwhm_px
    )
    contamination = stars.contamination(px, py, flux, segments, r_ap, fwhm_px)
    flags[contamination > max_contamination] |= FLAG_CROWDED
    flags[centroids.bright & ~centroids.use] |= FLAG_CENTROID
    flags[~(np.isfinite(flux) & (flux > 0))] |= FLAG_NO_FLUX
    return flags, contamination, segments
