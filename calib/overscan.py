"""Overscan subtraction: remove each frame's bias level, as tracked by the
overscan columns read out beside the data."""

from __future__ import annotations

from typing import Literal

import numpy as np

OverscanMethod = Literal["mean", "median", "median_per_row"]


def overscan_level(
    overscan: np.ndarray, *, method: OverscanMethod = "median_per_row"
) -> np.ndarray:
    """Bias level estimated from the overscan columns.

    Parameters
    ----------
    overscan : ndarray, shape (ny, n_overscan), ADU
        The overscan section (BIASSEC) of one quadrant.
    method : {'mean', 'median', 'median_per_row'}
        ``mean``/``median`` give one level for the frame; ``median_per_row`` one per
        row, which also removes row-correlated read noise common to data and
        overscan.

    Returns
    -------
    ndarray, shape (ny, 1), ADU
        Broadcastable against the data section.
    """
    overscan = np.asarray(overscan)
    if overscan.ndim != 2 or overscan.shape[1] == 0:
        raise ValueError(
            f"overscan must be a 2-D (ny, n_overscan) array, got shape {overscan.shape}"
        )
    ny = overscan.shape[0]
    if method == "mean":
        return np.full((ny, 1), np.nanmean(overscan))
    if method == "median":
        return np.full((ny, 1), np.nanmedian(overscan))
    if method == "median_per_row":
        return np.nanmedian(overscan, axis=1, keepdims=True)
    raise ValueError(f"method must be 'mean', 'median' or 'median_per_row', got {method!r}")


def subtract_overscan(
    data: np.ndarray, overscan: np.ndarray, *, method: OverscanMethod = "median_per_row"
) -> np.ndarray:
    """Data section minus the overscan level, float32 ADU, shape of ``data``."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[0] != np.shape(overscan)[0]:
        raise ValueError(
            f"data {data.shape} and overscan {np.shape(overscan)} must be 2-D with the same rows"
        )
    return (data - overscan_level(overscan, method=method)).astype(np.float32)
