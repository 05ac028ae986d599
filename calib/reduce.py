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

import numpy as np
from scipy import ndimage

from calib.bits import (
    MASK_BAD_FLAT,
    MASK_BITS,
    MASK_COSMIC,
    MASK_DEAD,
    MASK_DEFECTS,
    MASK_HOT,
    MASK_SATURATED,
)
from calib.overscan import OverscanMethod, subtract_overscan

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

_LAPLACIAN = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], dtype=np.float32)


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

    electrons = (subtract_overscan(data_adu, overscan_adu, method=overscan_method) - bias_adu) * (
        np.float32(gain)
    )
    variance_e = np.clip(electrons, 0.0, None) + np.float32(read_noise_e**2)

    flat = np.asarray(flat, dtype=np.float32)
    good_flat = np.isfinite(flat) & (flat >= min_flat)
    safe_flat = np.where(good_flat, flat, np.float32(1.0))
    sb = np.where(good_flat, electrons / safe_flat, 0.0).astype(np.float32)
    var_sb = np.where(good_flat, variance_e / safe_flat**2, 0.0).astype(np.float32)

    mask = np.zeros(shape, dtype=np.uint8)
    if defects is not None:
        mask |= np.asarray(defects, dtype=np.uint8) & MASK_DEFECTS
    mask[~good_flat] |= MASK_BAD_FLAT
    saturated = ndimage.binary_dilation(data_adu >= saturate_adu, np.ones((3, 3), bool))
    mask[saturated] |= MASK_SATURATED
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


def detect_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    sigclip: float = 5.0,
    sigfrac: float = 0.3,
    objlim: float = 3.0,
) -> np.ndarray:
    """Cosmic-ray pixels by Laplacian edge detection (van Dokkum 2001, L.A.Cosmic).

    A pixel is a cosmic ray when its Laplacian (computed as on the 2x
    sub-sampled image, so adjacent hit pixels do not cancel), less the local
    median of that Laplacian, exceeds ``sigclip`` times the local noise, and is
    more than ``objlim`` times the image's fine structure (``med3 - med7(med3)``):
    stars are smooth on the scale of the PSF and have a large fine structure,
    cosmic rays have none. Neighbours above ``sigclip``, then their neighbours
    above ``sigfrac * sigclip``, join the detections.

    The median filters, the costly part of L.A.Cosmic, are evaluated only at the
    candidate pixels (Laplacian significance above ``sigclip``), which makes the
    detector linear in the image size with a small constant; one iteration.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), e-
    variance : ndarray, shape (ny, nx), e-^2
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels never flagged (saturated, defects, unusable).
    sigclip, sigfrac, objlim : float
        Thresholds, as in L.A.Cosmic.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if np.shape(variance) != image.shape:
        raise ValueError(f"variance has shape {np.shape(variance)}, expected {image.shape}")
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, expected {image.shape}")
    excluded = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, bool)
    # The 5x5 mean keeps a hit's own (huge) variance from hiding it.
    noise = np.sqrt(ndimage.uniform_filter(np.asarray(variance, np.float32), 5, mode="nearest"))
    noise = np.maximum(noise, np.float32(1e-3))
    significance = _laplacian_plus(image) / (2.0 * noise)
    found = np.zeros(image.shape, bool)
    iy, ix = np.nonzero((significance > sigclip) & ~excluded)
    if len(iy) == 0:
        return found
    s_prime = significance[iy, ix] - _window_median(significance, iy, ix, 2)
    fine = (_med3(image, iy, ix) - _med7_of_med3(image, iy, ix)) / noise[iy, ix]
    fine = np.maximum(fine, 0.01)
    hit = (s_prime > sigclip) & (s_prime / fine > objlim)
    found[iy[hit], ix[hit]] = True
    for threshold in (sigclip, sigfrac * sigclip):
        ny_, nx_ = np.nonzero(ndimage.binary_dilation(found, np.ones((3, 3), bool)) & ~found)
        if len(ny_) == 0:
            break
        sp = significance[ny_, nx_] - _window_median(significance, ny_, nx_, 2)
        grow = (sp > threshold) & ~excluded[ny_, nx_]
        found[ny_[grow], nx_[grow]] = True
    return found


def _laplacian_plus(image: np.ndarray) -> np.ndarray:
    """Positive part of the Laplacian of the 2x sub-sampled image, block-averaged
    back: each sub-pixel sees its value twice minus one neighbour in x and one in y."""
    p = np.pad(image, 1, mode="edge")
    c = p[1:-1, 1:-1]
    left, right = p[1:-1, :-2], p[1:-1, 2:]
    down, up = p[:-2, 1:-1], p[2:, 1:-1]
    out = np.zeros_like(c)
    for a in (left, right):
        for b in (down, up):
            out += np.clip(2.0 * c - a - b, 0.0, None)
    return out / 4.0


def _gather(image: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int) -> np.ndarray:
    """Windows (n, 2 half + 1, 2 half + 1) around pixels, edges repeated."""
    offs = np.arange(-half, half + 1)
    ny, nx = image.shape
    yy = np.clip(iy[:, None, None] + offs[None, :, None], 0, ny - 1)
    xx = np.clip(ix[:, None, None] + offs[None, None, :], 0, nx - 1)
    return image[yy, xx]


def _window_median(image: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int) -> np.ndarray:
    w = _gather(image, iy, ix, half)
    return np.median(w.reshape(len(iy), -1), axis=1)


def _med3(image: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    return _window_median(image, iy, ix, 1)


def _med7_of_med3(image: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    w = _gather(image, iy, ix, 4)  # (n, 9, 9): the 3x3 medians of the central 7x7
    n = len(iy)
    med3 = np.empty((n, 7, 7), dtype=w.dtype)
    for dy in range(7):
        for dx in range(7):
            med3[:, dy, dx] = np.median(w[:, dy : dy + 3, dx : dx + 3].reshape(n, 9), axis=1)
    return np.median(med3.reshape(n, 49), axis=1)
