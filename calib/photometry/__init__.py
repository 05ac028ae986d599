"""Background, forced aperture photometry of reference stars, aperture
corrections, flags, and a detection-based QA of the astrometry.

The order follows seed 003: the background is estimated on the surface-brightness
image (:func:`estimate_background`), subtracted there, and the result multiplied by
the pixel area (:func:`calib.reduce.to_fluence`); stars are then photometered on
that fluence image (:func:`photometer_quadrant`), in electrons. The flag bits of a
measurement are in :mod:`calib.bits` (:data:`FLAG_BITS`, 0 = good).

One module per algorithm:

================  ===============================================================
module            what
================  ===============================================================
``background``    mesh background of the surface-brightness image
``positions``     catalog stars' pixel positions from the WCS
``fwhm``          the PSF's FWHM from adaptive second moments
``centroids``     Gaussian-windowed (XWIN) centroids
``apertures``     exact-overlap circular aperture sums
``crowding``      neighbours' light in an aperture; uncatalogued sources
``apcorr``        aperture corrections, per quadrant and pooled per exposure
``magnitudes``    instrumental magnitudes (BRIEF §4)
``detection``     detected sources matched to the forced positions (QA)
``qa``            per-quadrant QA numbers of the exposures group
``quadrant``      the chain on one quadrant: :func:`photometer_quadrant`
================  ===============================================================
"""

from calib.bits import (
    FLAG_BITS,
    FLAG_CENTROID,
    FLAG_COSMIC,
    FLAG_CROWDED,
    FLAG_DEFECT,
    FLAG_EDGE,
    FLAG_NO_FLUX,
    FLAG_SATURATED,
)
from calib.photometry.apcorr import ApertureCorrection, apply_aperture_corrections
from calib.photometry.apertures import aperture_sums
from calib.photometry.background import BackgroundMap, estimate_background
from calib.photometry.centroids import refine_centroids
from calib.photometry.detection import DetectionQA, match_detections
from calib.photometry.fwhm import measure_fwhm
from calib.photometry.magnitudes import instrumental_magnitudes
from calib.photometry.positions import catalog_positions
from calib.photometry.quadrant import QuadrantPhotometry, photometer_quadrant

__all__ = [
    "FLAG_BITS",
    "FLAG_CENTROID",
    "FLAG_COSMIC",
    "FLAG_CROWDED",
    "FLAG_DEFECT",
    "FLAG_EDGE",
    "FLAG_NO_FLUX",
    "FLAG_SATURATED",
    "ApertureCorrection",
    "BackgroundMap",
    "DetectionQA",
    "QuadrantPhotometry",
    "aperture_sums",
    "apply_aperture_corrections",
    "catalog_positions",
    "estimate_background",
    "instrumental_magnitudes",
    "match_detections",
    "measure_fwhm",
    "photometer_quadrant",
    "refine_centroids",
]
