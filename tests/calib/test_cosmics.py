"""The compiled L.A.Cosmic detector returns what the whole-image formulation with
scipy's filters returns (the candidate-only evaluation changes the cost, not the
answer). Its recall against the simulator's truth is in test_reduce.py."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from calib.cosmics import detect_cosmic_rays


def _whole_image_lacosmic(image, variance, excluded, sigclip=5.0, sigfrac=0.3, objlim=3.0):
    """L.A.Cosmic with full-image filters: med5 of the significance, med3 and
    med7(med3) of the image ('nearest' edges), one iteration, two growth rings."""
    noise = np.maximum(
        np.sqrt(ndimage.uniform_filter(variance, 5, mode="nearest")), np.float32(1e-3)
    )
    p = np.pad(image, 1, mode="edge")
    c = p[1:-1, 1:-1]
    lap = np.zeros_like(c)
    for a in (p[1:-1, :-2], p[1:-1, 2:]):
        for b in (p[:-2, 1:-1], p[2:, 1:-1]):
            lap += np.clip(2.0 * c - a - b, 0.0, None)
    significance = (lap / 4.0) / (2.0 * noise)
    s_prime = significance - ndimage.median_filter(significance, 5, mode="nearest")
    med3 = ndimage.median_filter(image, 3, mode="nearest")
    fine = np.maximum((med3 - ndimage.median_filter(med3, 7, mode="nearest")) / noise, 0.01)
    found = (significance > sigclip) & ~excluded & (s_prime > sigclip) & (s_prime / fine > objlim)
    for threshold in (sigclip, sigfrac * sigclip):
        ring = ndimage.binary_dilation(found, np.ones((3, 3), bool)) & ~found
        found |= ring & (s_prime > threshold) & ~excluded
    return found


def test_detections_equal_the_whole_image_formulation():
    rng = np.random.default_rng(7)
    ny, nx = 120, 150
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = rng.normal(200.0, 15.0, (ny, nx))
    for y0, x0, flux in ((40.3, 50.7, 4e4), (80.0, 100.2, 2e5), (30.5, 120.5, 8e3)):  # stars
        image += flux / (2 * np.pi * 1.8**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 3.24 / 2)
    # Hits (single pixels and short tracks) away from the edges, where med7 of
    # med3 at the border differs by construction (the detector repeats edges
    # before the medians), and one on a star's wing.
    for _ in range(25):
        y, x = rng.integers(10, ny - 10), rng.integers(10, nx - 10)
        image[y, x : x + rng.integers(1, 4)] += rng.uniform(300.0, 3000.0)
    image[42, 53] += 2000.0
    image = image.astype(np.float32)
    variance = (np.clip(image, 0, None) + 25.0).astype(np.float32)
    excluded = np.zeros(image.shape, bool)
    excluded[60:63, 20:23] = True
    image[61, 21] += 5000.0  # excluded: never flagged

    found = detect_cosmic_rays(image, variance, mask=excluded)
    reference = _whole_image_lacosmic(image, variance, excluded)
    np.testing.assert_array_equal(found, reference)
    # The comparison is not empty: most hits found, none at the stars' cores.
    assert found.sum() >= 25
    assert not found[60:63, 20:23].any()
    assert not found[39:42, 49:52].any()
    assert not found[79:82, 99:102].any()
