"""Mesh background of a surface-brightness image (seed 003: backgrounds are
estimated on surface brightness, not on fluence)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from calib._filters import dilate_cross, uniform_filter
from calib.photometry._mesh import MeshStats, mesh_statistics

__all__ = ["BackgroundMap", "estimate_background"]


@dataclass(frozen=True, eq=False)
class BackgroundMap:
    """Background of a surface-brightness image.

    Attributes
    ----------
    background : ndarray, shape (ny, nx), float32, e- per nominal pixel
    rms : ndarray, shape (ny, nx), float32, e- per nominal pixel
        Pixel-to-pixel scatter of the sky.
    level_err : ndarray, shape (ny, nx), float32, e- per nominal pixel
        Uncertainty of ``background`` itself (rms over the square root of the
        unmasked pixels behind each interpolated value).
    box_size : int
        Mesh size, pixels.
    """

    background: np.ndarray
    rms: np.ndarray
    level_err: np.ndarray
    box_size: int


def estimate_background(
    surface_brightness: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    box_size: int = 64,
    filter_size: int = 3,
    clip_sigma: float = 3.0,
    source_sigma: float = 3.0,
    source_grow_px: int = 3,
    source_min_pixels: int = 5,
    estimator: Literal["mean", "median"] = "mean",
) -> BackgroundMap:
    """Mesh background of a surface-brightness image (photutils ``Background2D``'s
    estimate, computed by :func:`calib.photometry._mesh.mesh_statistics`).

    Two passes: a first estimate finds the pixels more than ``source_sigma``
    times the rms above it (after 3x3 smoothing), which are grown by
    ``source_grow_px`` and masked, with ``mask``, for the second pass. Masking
    star wings this way matters in crowded fields: sigma clipping alone leaves
    them in and biases the background high.

    Parameters
    ----------
    surface_brightness : ndarray, shape (ny, nx), e- per nominal pixel
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels to ignore (defects, saturation, cosmic rays).
    box_size : int
        Mesh size in pixels; clipped to the image size.
    filter_size : int
        Median filter over meshes (odd).
    clip_sigma : float
        Sigma clipping within a mesh.
    source_sigma : float
        Source-mask threshold.
    source_grow_px : int
        Source-mask dilation, pixels.
    source_min_pixels : int
        Connected pixels a source needs.
    estimator : {'mean', 'median'}
        Sky level of a mesh after clipping and source masking. The clipped mean is
        what an aperture contains on average: faint sources below the detection
        threshold skew the sky's pixel distribution upwards, and a median then sits
        below the mean, so every aperture collects their excess as flux
        (docs/photometry.md: 35 e- per aperture on the ``small`` preset with the
        median, 10 e- with the mean).

    Returns
    -------
    BackgroundMap
    """
    image = np.asarray(surface_brightness, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"surface_brightness must be 2-D, got shape {image.shape}")
    if box_size < 4:
        raise ValueError(f"box_size must be >= 4 pixels, got {box_size}")
    if filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"filter_size must be a positive odd integer, got {filter_size}")
    if estimator not in ("mean", "median"):
        raise ValueError(f"estimator must be 'mean' or 'median', got {estimator!r}")
    bad = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, bool)
    if bad.shape != image.shape:
        raise ValueError(f"mask has shape {bad.shape}, expected {image.shape}")
    box = (min(box_size, image.shape[0]), min(box_size, image.shape[1]))
    # The first pass only finds sources: the robust median is the right tool there.
    first = _meshes(image, bad, box, filter_size, clip_sigma, "median")
    smooth = uniform_filter(image, 3)
    # 3x3 smoothing lowers white noise by 3: compare with rms / 3. The first pass
    # only finds sources: its meshes are held over their boxes, not interpolated.
    first_rms = np.asarray(first.rms, np.float32)
    sources = _above(smooth, first.background, source_sigma * first_rms / 3.0, box)
    # Only connected groups of pixels are sources: masking lone noise peaks would
    # remove the sky's upper fluctuations and bias the background low.
    labels, n_labels = ndimage.label(sources)
    if n_labels:
        sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)
        sources = (sizes >= source_min_pixels)[labels] & sources
    if source_grow_px > 0:
        sources = dilate_cross(sources, source_grow_px)
    try:
        second = _meshes(image, bad | sources, box, filter_size, clip_sigma, estimator)
        masked = bad | sources
    except ValueError:
        # Sources cover nearly every mesh (a cluster core): keep the first pass.
        second, masked = first, bad
    n_per_value = box[0] * box[1] * filter_size**2 * max(1.0 - float(masked.mean()), 0.05)
    # The rms varies slowly and enters only errors and thresholds: mesh values do.
    rms = np.asarray(second.rms, np.float32)
    # A median's standard error is sqrt(pi / 2) times the mean's.
    level_err = ((1.2533 if estimator == "median" else 1.0) * rms / np.sqrt(n_per_value)).astype(
        np.float32
    )
    return BackgroundMap(
        background=_zoom(second.background, box, image.shape),
        rms=_expand(rms, box, image.shape),
        level_err=_expand(level_err, box, image.shape),
        box_size=int(box_size),
    )


def _expand(mesh: np.ndarray, box: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Mesh values repeated over their boxes (nearest-mesh image), float32."""
    out = np.repeat(np.repeat(np.asarray(mesh, np.float32), box[0], 0), box[1], 1)
    out = out[: shape[0], : shape[1]]
    pad = ((0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1]))
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def _above(
    image: np.ndarray, level_mesh: np.ndarray, threshold_mesh: np.ndarray, box: tuple[int, int]
) -> np.ndarray:
    """``image - level > threshold`` with mesh values held over their boxes, one
    row of meshes at a time (no full-size level and threshold images)."""
    ny, nx = image.shape
    level_mesh = np.asarray(level_mesh, np.float32)
    threshold_mesh = np.asarray(threshold_mesh, np.float32)
    out = np.empty(image.shape, bool)
    last = level_mesh.shape[0] - 1
    for r0 in range(0, ny, box[0]):
        i = min(r0 // box[0], last)
        level = _expand(level_mesh[i : i + 1], (1, box[1]), (1, nx))
        threshold = _expand(threshold_mesh[i : i + 1], (1, box[1]), (1, nx))
        rows = slice(r0, r0 + box[0])
        np.greater(image[rows] - level, threshold, out=out[rows])
    return out


def _zoom(mesh: np.ndarray, box: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """photutils' mesh-to-image interpolation (``scipy.ndimage.zoom``, cubic
    spline, ``mode='reflect'``, ``grid_mode=True``, clipped to the mesh range) as
    a product of two 1-D interpolation matrices: the spline is separable, and
    two small matrix products cost 0.05 s on a ZTF quadrant where the 2-D
    evaluation cost 0.5 s (same float32 values: tests/calib/test_photometry.py)."""
    mesh = np.asarray(mesh)
    if np.ptp(mesh) == 0:
        return np.full(shape, np.min(mesh), dtype=np.float32)
    zy = _zoom_matrix(mesh.shape[0], box[0])[: shape[0]]  # (ny, mesh_ny)
    zx = _zoom_matrix(mesh.shape[1], box[1])[: shape[1]]  # (nx, mesh_nx)
    image = (zy @ mesh.astype(np.float64)) @ zx.T
    np.clip(image, np.min(mesh), np.max(mesh), out=image)
    return image.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _zoom_matrix(n: int, factor: int) -> np.ndarray:
    """(n * factor, n): column k is the zoomed unit vector k."""
    columns = [ndimage.zoom(e, factor, order=3, mode="reflect", grid_mode=True) for e in np.eye(n)]
    matrix = np.stack(columns, axis=1)
    matrix.flags.writeable = False
    return matrix


def _meshes(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int],
    filter_size: int,
    clip: float,
    estimator: Literal["mean", "median"],
) -> MeshStats:
    """``Background2D(image, box, mask=mask, filter_size=filter_size,
    sigma_clip=SigmaClip(clip, maxiters=10), exclude_percentile=80)``'s meshes
    with the mean or median estimator and the standard-deviation rms, the same
    float32 values at a fifth of the cost (docs/photometry.md)."""
    return mesh_statistics(
        image, mask, box, filter_size=filter_size, clip_sigma=clip, maxiters=10,
        estimator=estimator, exclude_percentile=80.0,
    )  # fmt: skip
