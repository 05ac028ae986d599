"""Per-quadrant QA of the photometry: the numbers each quadrant contributes to
``nights/<night>/exposures`` beside its zero point."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from calib.bits import MASK_COSMIC
from calib.photometry.detection import match_detections
from calib.photometry.quadrant import QuadrantPhotometry
from calib.reduce import ReducedQuadrant

__all__ = ["QuadrantQA", "quadrant_qa"]


@dataclass(frozen=True)
class QuadrantQA:
    """QA of one photometered quadrant.

    Attributes
    ----------
    n_stars, n_clean : float
        Forced stars, and those with no flag.
    n_cosmic_px : float
        Pixels flagged as cosmic rays.
    centroid_dx_px, centroid_dy_px : float
        Median refined - forced position of the bright stars, px.
    match_rate : float
        Fraction of the clean S/N > 20 stars with a detection within 1.5 px (NaN
        when detection is off).
    astrometric_rms_px : float
        Robust rms of detected - forced positions, px (NaN when off).
    """

    n_stars: float
    n_clean: float
    n_cosmic_px: float
    centroid_dx_px: float
    centroid_dy_px: float
    match_rate: float = float("nan")
    astrometric_rms_px: float = float("nan")

    def as_row(self) -> dict[str, float]:
        """The fields by name, in order."""
        return dataclasses.asdict(self)


def quadrant_qa(
    reduced: ReducedQuadrant,
    phot: QuadrantPhotometry,
    x_wcs: np.ndarray,
    y_wcs: np.ndarray,
    *,
    detect: bool = True,
) -> QuadrantQA:
    """QA numbers of one quadrant; ``detect`` adds the detection match
    (photutils ``DAOStarFinder`` on the fluence image).

    Parameters
    ----------
    reduced : ReducedQuadrant
    phot : QuadrantPhotometry
        Its photometry.
    x_wcs, y_wcs : ndarray, shape (n_stars,), px
        The forced stars' WCS positions (``phot.index`` rows of the input).
    detect : bool
    """
    qa = QuadrantQA(
        n_stars=float(len(phot.index)),
        n_clean=float(np.count_nonzero(phot.flags == 0)),
        n_cosmic_px=float(np.count_nonzero(reduced.mask & MASK_COSMIC)),
        centroid_dx_px=phot.centroid_offset_px[0],
        centroid_dy_px=phot.centroid_offset_px[1],
    )
    if not (detect and len(phot.index)):
        return qa
    # Background subtracted on surface brightness, as for the photometry.
    sb = reduced.surface_brightness - np.float32(phot.background_e)
    fluence = (sb * reduced.pixel_area).astype(np.float32)
    noise = float(np.sqrt(np.median(reduced.variance)))
    found = match_detections(
        fluence,
        x_wcs,
        y_wcs,
        # Match rate over the clean stars: blends and saturated stars are
        # rightly not single detections.
        np.where(phot.flags == 0, phot.flux_e / phot.flux_err_e, np.nan),
        fwhm_px=phot.fwhm_px,
        noise_e=max(noise, 1e-3),
    )
    return dataclasses.replace(
        qa, match_rate=found.match_rate, astrometric_rms_px=found.astrometric_rms_px
    )
