"""Instrument-signature removal for one readout quadrant: overscan, bias, gain,
flat, masks (defects, saturation, cosmic rays), and the seed-003 images.

Seed 003's three rules, as this module applies them:

1. Dividing by a dome flat gives a *surface-brightness* image
   (:attr:`ReducedQuadrant.surface_brightness`, electrons per nominal pixel):
   the dome flat contains the pixel area, so the sky is flat on it.
2. Backgrounds are estimated on that image (``calib.photometry``).
3. Stars are photometered on the *fluence* image, surface brightness x pixel
   area (:func:`to_fluence`), where a star's electrons are conserved whatever the
   distortion. ``apply_pixel_area=False`` skips the multiplication, for
   comparison only.

Mask bits (``uint8``, :data:`calib.bits.MASK_BITS`): 1 hot, 2 dead (both from the
master flat's defect map), 4 saturated (raw >= ``SATURATE``, grown by one pixel), 8
cosmic ray, 16 unusable flat (non-finite or below ``min_flat``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from calib._filters import dilate_square
from calib.bits import (
    MASK_BAD_FLAT,
    MASK_BITS,
    MASK_COSMIC,
    MASK_DEAD,
    MASK_DEFECTS,
    MASK_HOT,
    MASK_SATURATED,
)
from calib.cosmics import detect_cosmic_rays
from calib.overscan import OverscanMethod, overscan_level

__all__ = [
    "MASK_BAD_FLAT",
    "MASK_BITS",
    "MASK_COSMIC",
    "MASK_DEAD",
    "MASK_HOT",
    "MASK_SATURATED",
    "ReducedQuadrant",
    "detect_cosmic_rays",
    "reduce_quadrant",
    "to_fluence",
]


# eq=False: comparing arrays field by field has no single truth value.
@dataclass(frozen=True, eq=False)
class ReducedQuadrant:
    """One reduced readout quadrant.

    Attributes
    ----------
    surface_brightness : ndarray, shape (ny, nx), float32, e- per nominal pixel
        ``(raw - overscan - bias) * gain / flat``; 0 where the flat is unusable.
    variance : ndarray, shape (ny, nx), float32, e-^2
        Photon + read-noise variance of ``surface_brightness``.
    pixel_area : ndarray, shape (ny, nx), float64
        Relative pixel area used to make fluence (all ones when the Jacobian
        correction is off).
    mask : ndarray, shape (ny, nx), uint8
        Bit mask, see :data:`MASK_BITS`.
    gain : float
        e-/ADU.
    read_noise_e : float
        e-.
    apply_pixel_area : bool
        Whether ``pixel_area`` is the WCS Jacobian (True) or ones (False).
    """

    surface_brightness: np.ndarray
    variance: np.ndarray
    pixel_area: np.ndarray
    mask: np.ndarray
    gain: float
    read_noise_e: float
    apply_pixel_area: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.surface_brightness.shape  # type: ignore[return-value]


def reduce_quadrant(
    data_adu: np.ndarray,
    overscan_adu: np.ndarray,
    *,
    bias_adu: np.ndarray,
    flat: np.ndarray,
    gain: float,
    read_noise_e: float,
    saturate_adu: float,
    pixel_area: np.ndarray | None,
    defects: np.ndarray | None = None,
    apply_pixel_area: bool = True,
    overscan_method: OverscanMethod = "median_per_row",
    min_flat: float = 0.05,
    detect_cosmics: bool = True,
    cosmic_sigclip: float = 5.0,
    cosmic_objlim: float = 3.0,
) -> ReducedQuadrant:
    """Overscan, bias, gain and flat correction with masks.

    Parameters
    ----------
    data_adu : ndarray, shape (ny, nx), ADU
        Raw data section.
    overscan_adu : ndarray, shape (ny, n_overscan), ADU
        Raw overscan section, same rows.
    bias_adu : ndarray, shape (ny, nx), ADU
        Overscan-subtracted master bias.
    flat : ndarray, shape (ny, nx)
        Master flat, normalised (mean 1 over the focal plane), in electrons.
    gain : float
        e-/ADU, > 0.
    read_noise_e : float
        e-, >= 0.
    saturate_adu : float
        Raw level at or above which a pixel is saturated, ADU.
    pixel_area : ndarray, shape (ny, nx), or None
        Relative pixel area (:func:`calib.pixel_area.pixel_area_map`); required
        when ``apply_pixel_area`` is True.
    defects : ndarray, shape (ny, nx), uint8, optional
        Defect bits, 1 hot, 2 dead.
    apply_pixel_area : bool
        False turns the Jacobian correction off (fluence = surface brightness).
    overscan_method : {'mean', 'median', 'median_per_row'}
        See :func:`calib.overscan.subtract_overscan`.
    min_flat : float
        Flat values below this (or non-finite) are unusable pixels.
    detect_cosmics : bool
        Run :func:`detect_cosmic_rays`.
    cosmic_sigclip, cosmic_objlim : float
        Passed to :func:`detect_cosmic_rays`.

    Returns
    -------
    ReducedQuadrant
    """
    data_adu = np.asarray(data_adu)
    if data_adu.ndim != 2:
        raise ValueError(f"data_adu must be 2-D (ny, nx), got shape {data_adu.shape}")
    shape = data_adu.shape
    for name, arr in (("bias_adu", bias_adu), ("flat", flat)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, expected {shape} like data_adu")
    if defects is not None and np.shape(defects) != shape:
        raise ValueError(f"defects has shape {np.shape(defects)}, expected {shape}")
    if not gain > 0:
        raise ValueError(f"gain must be > 0 e-/ADU, got {gain}")
    if not read_noise_e >= 0:
        raise ValueError(f"read_noise_e must be >= 0, got {read_noise_e}")
    if apply_pixel_area:
        if pixel_area is None:
            raise ValueError("pixel_area is required when apply_pixel_area is True")
        if np.shape(pixel_area) != shape:
            raise ValueError(f"pixel_area has shape {np.shape(pixel_area)}, expected {shape}")
        area = np.asarray(pixel_area, dtype=np.float64)
    else:
        area = np.ones(shape)

    level = overscan_level(overscan_adu, method=overscan_method)
    if level.shape[0] != shape[0]:
        raise ValueError(
            f"data {shape} and overscan {np.shape(overscan_adu)} must be 2-D with the same rows"
        )
    sb, var_sb, mask, saturated = _reduce_pixels(
        data_adu,
        np.asarray(level[:, 0], dtype=np.float64),
        np.asarray(bias_adu),
        np.asarray(flat, dtype=np.float32),
        np.zeros(shape, np.uint8) if defects is None else np.asarray(defects, dtype=np.uint8),
        np.float32(gain),
        np.float32(read_noise_e**2),
        np.float32(min_flat),
        # Compared as numpy compares the array with a Python float.
        np.result_type(data_adu, saturate_adu).type(saturate_adu),
    )
    mask[dilate_square(saturated)] |= MASK_SATURATED
    if detect_cosmics:
        cosmic = detect_cosmic_rays(
            sb,
            var_sb,
            mask=mask != 0,
            sigclip=cosmic_sigclip,
            objlim=cosmic_objlim,
        )
        mask[cosmic] |= MASK_COSMIC
    return ReducedQuadrant(
        surface_brightness=sb,
        variance=var_sb,
        pixel_area=area,
        mask=mask,
        gain=float(gain),
        read_noise_e=float(read_noise_e),
        apply_pixel_area=bool(apply_pixel_area),
    )


def to_fluence(
    surface_brightness: np.ndarray, pixel_area: np.ndarray, variance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Surface brightness x pixel area (seed 003), and the variance scaled alike.

    Parameters
    ----------
    surface_brightness : ndarray, shape (ny, nx), e- per nominal pixel
        Usually background-subtracted.
    pixel_area : ndarray, shape (ny, nx)
        Relative pixel area.
    variance : ndarray, shape (ny, nx), e-^2, optional

    Returns
    -------
    fluence : ndarray, shape (ny, nx), float32, e-
    fluence_variance : ndarray, shape (ny, nx), float32, e-^2, or None
    """
    if np.shape(surface_brightness) != np.shape(pixel_area):
        raise ValueError(
            f"pixel_area has shape {np.shape(pixel_area)}, expected "
            f"{np.shape(surface_brightness)} like surface_brightness"
        )
    area = np.asarray(pixel_area)
    fluence = (surface_brightness * area).astype(np.float32)
    if variance is None:
        return fluence, None
    return fluence, (variance * area * area).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _reduce_pixels(
    data, level, bias, flat, defects, gain, rn2, min_flat, saturate
):  # pragma: no cover - compiled
    """Overscan, bias, gain and flat per pixel, with the defect and flat mask bits
    and the saturated pixels (before growing), in one pass: numpy's element-wise
    formulation (``(data - overscan)`` rounded to float32, ``(. - bias) * gain``,
    variance ``max(e, 0) + RN^2``, both over the flat where it is usable, else 0),
    the same operations and types per pixel, without its full-size temporaries."""
    ny, nx = data.shape
    sb = np.empty((ny, nx), np.float32)
    var = np.empty((ny, nx), np.float32)
    mask = np.empty((ny, nx), np.uint8)
    saturated = np.empty((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            electrons = (np.float32(np.float64(data[y, x]) - level[y]) - bias[y, x]) * gain
            # max(e, 0) + RN^2 in the type of e (numpy's clip keeps a NaN).
            variance = (electrons + rn2) if (electrons > 0 or electrons != electrons) else rn2
            f = flat[y, x]
            bits = defects[y, x] & MASK_DEFECTS
            if np.isfinite(f) and f >= min_flat:
                sb[y, x] = electrons / f
                var[y, x] = variance / (f * f)
            else:
                sb[y, x] = 0.0
                var[y, x] = 0.0
                bits |= MASK_BAD_FLAT
            mask[y, x] = bits
            saturated[y, x] = data[y, x] >= saturate
    return sb, var, mask, saturated
