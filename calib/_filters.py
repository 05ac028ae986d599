"""Compiled image filters that return exactly what their ``scipy.ndimage``
counterparts return, without their temporaries.

scipy's filters copy every line into a float64 buffer, filter it and copy it
back; on a ZTF quadrant (9.5 Mpx) a 3x3 ``uniform_filter`` costs 0.18 CPU s and
a 3-iteration ``binary_dilation`` 0.07 s. These kernels do the same arithmetic
in the same order (tested bit for bit against scipy in
``tests/calib/test_filters.py``) in one pass over the image, 5-10x faster:

- :func:`uniform_filter`: ``scipy.ndimage.uniform_filter`` on a 2-D float32
  image, ``mode`` 'reflect' or 'nearest'. scipy's running sum per line
  (``tmp += new - old`` in float64, each output ``tmp / size``), axis 0
  first, rounded to float32 between the axes.
- :func:`dilate_cross`: ``scipy.ndimage.binary_dilation(mask,
  iterations=n)`` with the default cross structure: every pixel within
  city-block distance ``n`` of a set pixel (border 0).
- :func:`dilate_square`: the same with the 3x3 square structure, one iteration.
"""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np

__all__ = ["dilate_cross", "dilate_square", "uniform_filter"]

_MODES = {"reflect": 0, "nearest": 1}


def uniform_filter(
    image: np.ndarray, size: int, *, mode: Literal["reflect", "nearest"] = "reflect"
) -> np.ndarray:
    """``scipy.ndimage.uniform_filter(image, size, mode=mode)`` of a 2-D float32
    image, the same float32 values.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
    size : int
        Window side, pixels (>= 1).
    mode : {'reflect', 'nearest'}
        Extension beyond the edges, as in scipy.

    Returns
    -------
    ndarray, shape (ny, nx), float32
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.float32:
        raise TypeError(f"image must be a 2-D float32 array, got {image.dtype} {image.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'reflect' or 'nearest', got {mode!r}")
    if size == 1:
        return image.copy()
    out = np.empty_like(image)
    _uniform_rows(np.ascontiguousarray(image), out, size, _MODES[mode])
    return out


def dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=iterations)`` (cross
    structure, border 0): every pixel within city-block distance ``iterations``
    of a set pixel."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if iterations < 1:
        return mask.copy()
    return _dilate_diamond(mask, int(iterations))


def dilate_square(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, np.ones((3, 3)))``: set pixels and
    their 8 neighbours (border 0)."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return _dilate_square(mask)


@numba.njit(cache=True, nogil=True, inline="always")
def _extend(i: int, n: int, mode: int) -> int:  # pragma: no cover - compiled
    """scipy.ndimage's index beyond the edges: 'reflect' (d c b a | a b c d) or
    'nearest' (a a | a b c d)."""
    if mode == 1:
        return min(max(i, 0), n - 1)
    period = 2 * n
    i = i % period
    if i < 0:
        i += period
    return i if i < n else period - 1 - i


@numba.njit(cache=True, nogil=True)
def _uniform_rows(image, out, size, mode):  # pragma: no cover - compiled
    """Both axes of scipy's uniform filter. Axis 0 keeps one running sum per
    column and walks down the rows (the same per-column arithmetic as scipy's
    line buffers, cache-friendly); axis 1 walks each row of that result."""
    ny, nx = image.shape
    before = size // 2
    inv = np.float64(size)
    tmp = np.zeros(nx)
    for k in range(size):
        row = _extend(k - before, ny, mode)
        for x in range(nx):
            tmp[x] += np.float64(image[row, x])
    for x in range(nx):
        out[0, x] = np.float32(tmp[x] / inv)
    for y in range(1, ny):
        add = _extend(y + size - 1 - before, ny, mode)
        drop = _extend(y - 1 - before, ny, mode)
        for x in range(nx):
            tmp[x] += np.float64(image[add, x]) - np.float64(image[drop, x])
            out[y, x] = np.float32(tmp[x] / inv)
    line = np.empty(nx + size - 1)
    for y in range(ny):
        for i in range(nx + size - 1):
            line[i] = np.float64(out[y, _extend(i - before, nx, mode)])
        acc = 0.0
        for k in range(size):
            acc += line[k]
        out[y, 0] = np.float32(acc / inv)
        for x in range(1, nx):
            acc += line[x + size - 1] - line[x - 1]
            out[y, x] = np.float32(acc / inv)


@numba.njit(cache=True, nogil=True)
def _dilate_diamond(mask, radius):  # pragma: no cover - compiled
    """City-block dilation: the horizontal distance to the nearest set pixel of
    each row (two sweeps, capped), then ``min over dy of (distance + |dy|)``."""
    ny, nx = mask.shape
    cap = radius + 1
    dist = np.empty((ny, nx), np.int32)
    for y in range(ny):
        d = cap
        for x in range(nx):
            d = 0 if mask[y, x] else min(d + 1, cap)
            dist[y, x] = d
        d = cap
        for x in range(nx - 1, -1, -1):
            d = 0 if mask[y, x] else min(d + 1, cap)
            dist[y, x] = min(dist[y, x], d)
    out = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for dy in range(-radius, radius + 1):
            yy = y + dy
            if yy < 0 or yy >= ny:
                continue
            reach = radius - abs(dy)
            for x in range(nx):
                if dist[yy, x] <= reach:
                    out[y, x] = True
    return out


@numba.njit(cache=True, nogil=True)
def _dilate_square(mask):  # pragma: no cover - compiled
    ny, nx = mask.shape
    rows = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            if mask[y, x]:
                rows[y, x] = True
                if x > 0:
                    rows[y, x - 1] = True
                if x < nx - 1:
                    rows[y, x + 1] = True
    out = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            if rows[y, x]:
                out[y, x] = True
                if y > 0:
                    out[y - 1, x] = True
                if y < ny - 1:
                    out[y + 1, x] = True
    return out
