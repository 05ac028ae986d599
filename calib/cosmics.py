"""Cosmic-ray detection by Laplacian edge detection (van Dokkum 2001,
L.A.Cosmic), one iteration, evaluated where it can matter.

The median filters that make L.A.Cosmic costly are evaluated only at the
candidate pixels (Laplacian significance above ``sigclip``), and the Laplacian,
the noise and the significance are one compiled pass over the image (numba; the
5x5 noise mean is :func:`calib._filters.uniform_filter`, scipy's to the bit).
The arithmetic is that of the numpy formulation it replaced, in float32 and in
the same order, so the detections are the same pixels (2026-12, a ZTF quadrant:
0.94 -> 0.1 CPU s, the same mask; ``tests/calib/test_reduce.py``).
"""

from __future__ import annotations

import numba
import numpy as np

from calib._filters import uniform_filter

__all__ = ["detect_cosmic_rays"]


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
        Finite values (a reduced image); computed in float32.
    variance : ndarray, shape (ny, nx), e-^2
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels never flagged (saturated, defects, unusable).
    sigclip, sigfrac, objlim : float
        Thresholds, as in L.A.Cosmic.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if np.shape(variance) != image.shape:
        raise ValueError(f"variance has shape {np.shape(variance)}, expected {image.shape}")
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, expected {image.shape}")
    excluded = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, bool)
    # The 5x5 mean keeps a hit's own (huge) variance from hiding it.
    noise = uniform_filter(np.asarray(variance, np.float32), 5, mode="nearest")
    significance = _significance(image, noise)  # noise becomes the noise in place
    # Thresholds in float32, as numpy compares a float32 array with a Python float.
    clip, frac, lim = np.float32(sigclip), np.float32(sigfrac * sigclip), np.float32(objlim)
    found = np.zeros(image.shape, bool)
    iy, ix = _candidates(significance, excluded, clip)
    if len(iy) == 0:
        return found
    hit = _confirm(image, significance, noise, iy, ix, clip, lim)
    fy, fx = iy[hit], ix[hit]
    found[fy, fx] = True
    for threshold in (clip, frac):
        ry, rx = _ring(found, fy, fx)
        if len(ry) == 0:
            break
        grow = _grows(significance, excluded, ry, rx, threshold)
        found[ry[grow], rx[grow]] = True
        fy, fx = np.concatenate([fy, ry[grow]]), np.concatenate([fx, rx[grow]])
    return found


@numba.njit(cache=True, nogil=True)
def _significance(image, noise):  # pragma: no cover - compiled
    """Laplacian significance ``lap+ / (2 noise)``, float32; ``noise`` (the 5x5
    mean variance on entry) becomes ``max(sqrt(.), 1e-3)`` in place.

    ``lap+`` is the positive part of the Laplacian of the 2x sub-sampled image,
    block-averaged back: each sub-pixel sees its value twice minus one neighbour
    in x and one in y (edges repeated), the four sums in the order left-down,
    left-up, right-down, right-up, each clipped at 0."""
    ny, nx = image.shape
    two, four, floor = np.float32(2.0), np.float32(4.0), np.float32(1e-3)
    out = np.empty((ny, nx), np.float32)
    for y in range(ny):
        down, up = max(y - 1, 0), min(y + 1, ny - 1)
        for x in range(nx):
            c = image[y, x]
            left, right = image[y, max(x - 1, 0)], image[y, min(x + 1, nx - 1)]
            lap = np.float32(0.0)
            for a in (left, right):
                for b in (image[down, x], image[up, x]):
                    t = two * c - a - b
                    lap += t if (t > 0 or t != t) else np.float32(0.0)
            n = np.sqrt(noise[y, x])
            n = n if (n > floor or n != n) else floor
            noise[y, x] = n
            out[y, x] = (lap / four) / (two * n)
    return out


@numba.njit(cache=True, nogil=True)
def _candidates(significance, excluded, clip):  # pragma: no cover - compiled
    """Pixels above ``clip`` and not excluded, in row-major order."""
    ny, nx = significance.shape
    count = 0
    for y in range(ny):
        for x in range(nx):
            if significance[y, x] > clip and not excluded[y, x]:
                count += 1
    iy = np.empty(count, np.int64)
    ix = np.empty(count, np.int64)
    k = 0
    for y in range(ny):
        for x in range(nx):
            if significance[y, x] > clip and not excluded[y, x]:
                iy[k], ix[k] = y, x
                k += 1
    return iy, ix


@numba.njit(cache=True, nogil=True, inline="always")
def _window(image, y, x, half, buf):  # pragma: no cover - compiled
    """The (2 half + 1)^2 window about (y, x), edges repeated, into ``buf``, row-major."""
    ny, nx = image.shape
    k = 0
    for dy in range(-half, half + 1):
        yy = min(max(y + dy, 0), ny - 1)
        for dx in range(-half, half + 1):
            buf[k] = image[yy, min(max(x + dx, 0), nx - 1)]
            k += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _median_odd(values):  # pragma: no cover - compiled
    """The middle value of an odd number of values (``np.median``: NaN if any
    is), by an insertion sort in place: windows of 9-49 values, no allocation."""
    n = len(values)
    for i in range(n):
        v = values[i]
        if v != v:
            return v
        j = i - 1
        while j >= 0 and values[j] > v:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = v
    return values[n // 2]


@numba.njit(cache=True, nogil=True)
def _median5(image, y, x, buf):  # pragma: no cover - compiled
    _window(image, y, x, 2, buf)
    return _median_odd(buf)


@numba.njit(cache=True, nogil=True)
def _fine_structure(image, y, x, w9, w3, m49):  # pragma: no cover - compiled
    """``med3 - med7(med3)`` at (y, x): the 3x3 median less the median of the 49
    3x3 medians of the 9x9 window (edges repeated before the medians)."""
    _window(image, y, x, 4, w9)
    for i in range(7):
        for j in range(7):
            k = 0
            for dy in range(3):
                for dx in range(3):
                    w3[k] = w9[(i + dy) * 9 + j + dx]
                    k += 1
            m49[i * 7 + j] = _median_odd(w3)
    med3 = m49[3 * 7 + 3]  # the centre's own 3x3 median
    return med3 - _median_odd(m49)


@numba.njit(cache=True, nogil=True)
def _confirm(image, significance, noise, iy, ix, clip, lim):  # pragma: no cover - compiled
    """Candidates whose significance above its 5x5 median passes ``clip`` and
    whose contrast over the fine structure passes ``lim``."""
    n = len(iy)
    hit = np.zeros(n, np.bool_)
    b25 = np.empty(25, np.float32)
    w9 = np.empty(81, np.float32)
    w3 = np.empty(9, np.float32)
    m49 = np.empty(49, np.float32)
    small = np.float32(0.01)
    for k in range(n):
        y, x = iy[k], ix[k]
        s_prime = significance[y, x] - _median5(significance, y, x, b25)
        if not s_prime > clip:
            continue
        fine = _fine_structure(image, y, x, w9, w3, m49) / noise[y, x]
        fine = fine if (fine > small or fine != fine) else small
        hit[k] = s_prime / fine > lim
    return hit


@numba.njit(cache=True, nogil=True)
def _ring(found, fy, fx):  # pragma: no cover - compiled
    """The 8-neighbours of the found pixels that are not found (the 3x3
    dilation less the set), each once, row-major."""
    ny, nx = found.shape
    cells = np.empty(8 * len(fy), np.int64)
    k = 0
    for i in range(len(fy)):
        for dy in range(-1, 2):
            yy = fy[i] + dy
            if yy < 0 or yy >= ny:
                continue
            for dx in range(-1, 2):
                xx = fx[i] + dx
                if xx < 0 or xx >= nx or found[yy, xx]:
                    continue
                cells[k] = yy * nx + xx
                k += 1
    cells = np.unique(cells[:k])
    return cells // nx, cells % nx


@numba.njit(cache=True, nogil=True)
def _grows(significance, excluded, ry, rx, threshold):  # pragma: no cover - compiled
    """Ring pixels whose significance above its 5x5 median passes ``threshold``."""
    grow = np.zeros(len(ry), np.bool_)
    b25 = np.empty(25, np.float32)
    for k in range(len(ry)):
        y, x = ry[k], rx[k]
        s_prime = significance[y, x] - _median5(significance, y, x, b25)
        grow[k] = s_prime > threshold and not excluded[y, x]
    return grow
