"""Sigma-clipped mesh statistics of an image: the low-resolution background and
rms meshes of photutils' ``Background2D``, the same float32 values, vectorised.

``Background2D`` (``SigmaClip`` with a median centre, ``MeanBackground`` or
``MedianBackground``, ``StdBackgroundRMS``, ``exclude_percentile``, a median
filter over meshes) spends its time in astropy's per-mesh clipping loop
(select a median, two passes for the standard deviation, compact the buffer,
repeat), in ``np.nanmedian`` row by row, and in ``generic_filter`` calling
``np.nanmedian`` once per mesh: 0.5 CPU s per pass on a ZTF quadrant. Here the
meshes are sorted once (numpy's vectorised sort), so that each clipping
iteration is a range of the sorted values: its mean and variance come from
prefix sums and its median is an element, and the loop costs nothing beside the
sort. The clipped values are then set to NaN in the mesh array of
``Background2D``'s own layout and the same numpy reductions
(``np.nanmean``, ``np.nanstd``) make the estimates, so they are bit for bit
``Background2D``'s (``tests/calib/test_mesh_background.py`` compares them on images
with partial edge meshes, masked and excluded meshes); the median estimator is
the middle element of the sorted range (or the float32 mean of the two middle
ones, as ``np.median`` computes it). The clipping bounds agree with astropy's
to rounding (they sum in another order), which could only matter for a pixel
exactly at a bound.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import numba
import numpy as np
from astropy.stats import SigmaClip
from astropy.utils.exceptions import AstropyUserWarning
from photutils.utils import ShepardIDWInterpolator

__all__ = ["MeshStats", "mesh_statistics"]


class MeshStats(NamedTuple):
    """Background and rms per mesh, after filling excluded meshes and the median
    filter: ``Background2D.background_mesh`` and ``.background_rms_mesh``."""

    background: np.ndarray  # (n_mesh_y, n_mesh_x) float32
    rms: np.ndarray  # (n_mesh_y, n_mesh_x) float32


def mesh_statistics(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int],
    *,
    filter_size: int,
    clip_sigma: float,
    maxiters: int = 10,
    estimator: Literal["mean", "median"],
    exclude_percentile: float = 80.0,
) -> MeshStats:
    """Sigma-clipped mesh statistics, as ``Background2D(image, box, mask=mask,
    filter_size=filter_size, sigma_clip=SigmaClip(clip_sigma, maxiters=maxiters),
    exclude_percentile=exclude_percentile)`` with the mean or median estimator and
    the standard-deviation rms.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
    mask : ndarray of bool, shape (ny, nx)
        Pixels to ignore; non-finite pixels are ignored too.
    box : tuple of int
        Mesh size ``(by, bx)``, at most the image size. Partial meshes at the
        top and right edges are kept, as ``Background2D`` keeps them.
    filter_size : int
        Median filter over meshes (odd; 1: none).
    clip_sigma, maxiters
        Sigma clipping about the median, within each mesh.
    estimator : {'mean', 'median'}
    exclude_percentile : float
        Meshes with this percentage of their pixels masked or more are excluded
        and filled by inverse-distance interpolation from the others.

    Returns
    -------
    MeshStats

    Raises
    ------
    ValueError
        When every pixel is masked or every mesh is excluded.
    """
    image = np.asarray(image, dtype=np.float32)
    bad = np.asarray(mask, dtype=bool) | ~np.isfinite(image)
    if bad.all():
        raise ValueError("every pixel is masked: no background")
    by, bx = box
    ny, nx = image.shape
    nby, nbx = ny // by, nx // bx
    y1, x1 = nby * by, nbx * bx
    limit = (1.0 - exclude_percentile / 100.0) * by * bx
    stats = _Stats(clip_sigma, maxiters, estimator, limit)

    # Element order within a mesh as Background2D lays it out: row-major for
    # the full meshes, column-major for the partial ones (its moveaxis).
    def core(a: np.ndarray) -> np.ndarray:
        return a[:y1, :x1].reshape(nby, by, nbx, bx).transpose(0, 2, 1, 3).reshape(nby * nbx, -1)

    level, rms = stats.rows(core(image), core(bad))
    level, rms = level.reshape(nby, nbx), rms.reshape(nby, nbx)
    if y1 < ny:  # a row of partial meshes along the top

        def top(a: np.ndarray) -> np.ndarray:
            return a[y1:, :x1].reshape(ny - y1, nbx, bx).transpose(1, 2, 0).reshape(nbx, -1)

        row_level, row_rms = stats.rows(top(image), top(bad))
        level, rms = np.vstack([level, row_level]), np.vstack([rms, row_rms])
    if x1 < nx:  # a column of partial meshes along the right, and the corner

        def right(a: np.ndarray) -> np.ndarray:
            return a[:y1, x1:].reshape(nby, by, nx - x1).transpose(0, 2, 1).reshape(nby, -1)

        col_level, col_rms = stats.rows(right(image), right(bad))
        if y1 < ny:
            corner_level, corner_rms = stats.corner(image[y1:, x1:], bad[y1:, x1:])
            col_level, col_rms = np.r_[col_level, corner_level], np.r_[col_rms, corner_rms]
        level, rms = np.hstack([level, col_level[:, None]]), np.hstack([rms, col_rms[:, None]])
    if np.isnan(level).all():
        raise ValueError(
            f"every {by}x{bx} mesh has more than {exclude_percentile:g} % of its pixels "
            "masked: no background"
        )
    return MeshStats(
        _median_filter(_fill(level), filter_size), _median_filter(_fill(rms), filter_size)
    )


class _Stats:
    """Per-mesh clipping and estimates of one configuration."""

    def __init__(
        self, sigma: float, maxiters: int, estimator: Literal["mean", "median"], limit: float
    ) -> None:
        self.sigma, self.maxiters, self.estimator, self.limit = sigma, maxiters, estimator, limit

    def rows(self, values: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level and rms of each row of ``values`` (n_mesh, n_pixels), a copy."""
        data = values.copy()  # a copy whatever the layout: NaNs are written into it
        data[bad] = np.nan
        ordered = np.sort(data, axis=-1)  # NaN last
        lower, upper, start, stop = _clip_sorted(ordered, float(self.sigma), int(self.maxiters))
        _blank_outside(data, lower, upper)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # empty meshes: NaN, excluded below
            if self.estimator == "median":
                level = _sorted_median(ordered, start, stop)
            else:
                level = np.nanmean(data, axis=-1)
            rms = np.nanstd(data, axis=-1)
        excluded = (stop - start) <= self.limit
        level[excluded] = np.nan
        rms[excluded] = np.nan
        return level, rms

    def corner(self, values: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The corner mesh, clipped as Background2D clips it (astropy, over the
        flattened values): one small mesh."""
        data = values.astype(np.float32)
        data[bad] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            clip = SigmaClip(sigma=self.sigma, maxiters=self.maxiters)
            data = clip(data, axis=None, masked=False, copy=False)
            kept = np.count_nonzero(~np.isnan(data))
            level = np.nanmedian(data) if self.estimator == "median" else np.nanmean(data)
            rms = np.nanstd(data)
        if kept <= self.limit:
            level = rms = np.float32(np.nan)
        return np.array([level], np.float32), np.array([rms], np.float32)


def _fill(mesh: np.ndarray) -> np.ndarray:
    """Excluded (NaN) meshes by inverse-distance weighting of the others, as
    ``Background2D`` fills them (photutils' ``ShepardIDWInterpolator``, its 10
    neighbours, power 1)."""
    holes = np.isnan(mesh)
    if not holes.any():
        return mesh
    good = np.column_stack(np.nonzero(~holes))
    interpolate = ShepardIDWInterpolator(good, mesh[~holes])
    out = mesh.copy()
    out[holes] = interpolate(np.column_stack(np.nonzero(holes)), n_neighbors=10, power=1.0)
    return out


def _median_filter(mesh: np.ndarray, size: int) -> np.ndarray:
    """``generic_filter(mesh, np.nanmedian, size, mode='constant', cval=nan)``,
    vectorised: the windows' values in float64, NaN outside, their median (the
    float64 mean of the two middle values for an even count) rounded to the
    mesh's float32."""
    if size == 1:
        return mesh
    half = size // 2
    ny, nx = mesh.shape
    padded = np.full((ny + 2 * half, nx + 2 * half), np.nan)
    padded[half : half + ny, half : half + nx] = mesh
    windows = np.stack(
        [padded[dy : dy + ny, dx : dx + nx] for dy in range(size) for dx in range(size)], axis=-1
    )
    windows.sort(axis=-1)
    count = np.count_nonzero(~np.isnan(windows), axis=-1)
    low = np.take_along_axis(windows, ((count - 1) // 2)[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(windows, (count // 2)[..., None], axis=-1)[..., 0]
    return np.where(count % 2 == 1, low, (low + high) / 2.0).astype(mesh.dtype)


@numba.njit(cache=True, nogil=True)
def _clip_sorted(ordered, sigma, maxiters):  # pragma: no cover - compiled
    """astropy's clipping loop on sorted rows (NaN last): per iteration the
    mean and population standard deviation of the kept range, the median, the
    bounds ``median -+ sigma std``, the values inside them kept; until nothing
    changes or ``maxiters``. Returns the last bounds and the range of the full
    row inside them (what the final mask keeps)."""
    m, n = ordered.shape
    lower = np.full(m, np.nan)
    upper = np.full(m, np.nan)
    start = np.zeros(m, np.int64)
    stop = np.zeros(m, np.int64)
    s1 = np.zeros(n + 1)
    s2 = np.zeros(n + 1)
    for r in range(m):
        row = ordered[r]
        count = n
        while count > 0 and np.isnan(row[count - 1]):
            count -= 1
        if count == 0:
            continue
        # Prefix sums about a central value keep the variance free of cancellation.
        centre = np.float64(row[count // 2])
        for i in range(count):
            d = np.float64(row[i]) - centre
            s1[i + 1] = s1[i] + d
            s2[i + 1] = s2[i] + d * d
        lo, hi = 0, count
        low, high = np.nan, np.nan
        iteration = 0
        while True:
            k = hi - lo
            mean = (s1[hi] - s1[lo]) / k
            var = max((s2[hi] - s2[lo]) / k - mean * mean, 0.0)
            std = np.sqrt(var)
            half = lo + k // 2
            if k % 2 == 0:
                median = 0.5 * (np.float64(row[half]) + np.float64(row[half - 1]))
            else:
                median = np.float64(row[half])
            low = median - sigma * std
            high = median + sigma * std
            new_lo, new_hi = lo, hi
            while new_lo < new_hi and row[new_lo] < low:
                new_lo += 1
            while new_hi > new_lo and row[new_hi - 1] > high:
                new_hi -= 1
            if new_hi - new_lo == k:
                break
            lo, hi = new_lo, new_hi
            iteration += 1
            if iteration >= maxiters or lo == hi:
                break
        a, b = 0, count
        while a < b and row[a] < low:
            a += 1
        while b > a and row[b - 1] > high:
            b -= 1
        lower[r], upper[r], start[r], stop[r] = low, high, a, b
    return lower, upper, start, stop


@numba.njit(cache=True, nogil=True)
def _blank_outside(data, lower, upper):  # pragma: no cover - compiled
    """NaN where a value is outside its row's bounds (astropy's final mask)."""
    m, n = data.shape
    for r in range(m):
        lo, hi = lower[r], upper[r]
        for i in range(n):
            v = np.float64(data[r, i])
            if v < lo or v > hi:
                data[r, i] = np.nan


@numba.njit(cache=True, nogil=True)
def _sorted_median(ordered, start, stop):  # pragma: no cover - compiled
    """``np.nanmedian`` of each row's kept range: the middle value, or the float32
    mean of the two middle values (``np.median`` of float32)."""
    m = ordered.shape[0]
    out = np.full(m, np.float32(np.nan), dtype=np.float32)
    for r in range(m):
        k = stop[r] - start[r]
        if k == 0:
            continue
        half = start[r] + k // 2
        if k % 2 == 1:
            out[r] = ordered[r, half]
        else:
            out[r] = (ordered[r, half - 1] + ordered[r, half]) / np.float32(2.0)
    return out
