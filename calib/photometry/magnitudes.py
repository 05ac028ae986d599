"""Instrumental magnitudes in the convention of BRIEF §4."""

from __future__ import annotations

import numpy as np

__all__ = ["instrumental_magnitudes"]


def instrumental_magnitudes(
    flux_e: np.ndarray, flux_err_e: np.ndarray, exptime_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """BRIEF §4 magnitudes: ``m_inst = -2.5 log10(flux_e / exptime_s)``.

    Parameters
    ----------
    flux_e, flux_err_e : ndarray, shape (n,), e-
    exptime_s : float, s

    Returns
    -------
    mag_inst, mag_inst_err : ndarray, shape (n,), mag
        NaN where the flux is not positive.
    """
    if not exptime_s > 0:
        raise ValueError(f"exptime_s must be > 0, got {exptime_s}")
    flux_e = np.asarray(flux_e, dtype=np.float64)
    good = np.isfinite(flux_e) & (flux_e > 0)
    safe = np.where(good, flux_e, 1.0)
    mag = np.where(good, -2.5 * np.log10(safe / exptime_s), np.nan)
    err = np.where(good, 2.5 / np.log(10.0) * np.asarray(flux_err_e) / safe, np.nan)
    return mag, err
