"""PSF constants shared by the centroid and FWHM estimators."""

FWHM_TO_SIGMA = 1.0 / 2.3548200450309493
"""A Gaussian's sigma per unit FWHM."""
