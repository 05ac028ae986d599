"""The detection QA on cutouts around the stars against DAOStarFinder on the whole
image: the same detections near each star, the same match."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning
from photutils.detection import DAOStarFinder
from scipy.spatial import cKDTree

from calib.photometry.detection import _detect_around, match_detections

NOISE_E = 10.0
FWHM_PX = 2.5


def _field(seed: int = 3):
    """Gaussian stars on white noise: a grid of bright ones (some by the edges and
    corners), close pairs, faint ones near the threshold, and uncatalogued ones."""
    rng = np.random.default_rng(seed)
    ny, nx = 230, 260
    sigma = FWHM_PX / 2.3548
    xs = np.r_[
        rng.uniform(-1.0, nx, 120),  # anywhere, also just outside or on the edges
        [0.3, 1.2, nx - 1.4, nx - 0.6, 2.0, nx - 2.0],  # by the edges and corners
    ]
    ys = np.r_[rng.uniform(-1.0, ny, 120), [ny / 2, 0.4, ny / 2, ny - 0.8, ny - 1.5, 1.0]]
    # Close pairs, and neighbours out to the edge of the finder's reach (~10 px).
    pairs = rng.uniform(20, 200, (40, 2))
    sep = np.r_[rng.uniform(1.5, 4.0, 15), rng.uniform(4.0, 12.0, 25)]
    xs = np.r_[xs, pairs[:, 0], pairs[:, 0] + sep]
    ys = np.r_[ys, pairs[:, 1], pairs[:, 1] + rng.uniform(-1, 1, 40)]
    flux = 10 ** rng.uniform(2.5, 5.0, len(xs))  # 5 sigma peak is ~ 10^3 e-
    image = rng.normal(0.0, NOISE_E, (ny, nx))
    yy, xx = np.mgrid[:ny, :nx]
    for x0, y0, f in zip(xs, ys, flux, strict=True):
        box = (np.abs(xx - x0) < 8) & (np.abs(yy - y0) < 8)
        image[box] += (
            f
            / (2 * np.pi * sigma**2)
            * np.exp(-((xx[box] - x0) ** 2 + (yy[box] - y0) ** 2) / (2 * sigma**2))
        )
    # The catalogue misses every fifth star; the faint ones give S/N below 20.
    catalogued = np.arange(len(xs)) % 5 != 0
    snr = flux / np.sqrt(flux + 20 * NOISE_E**2)
    return image, xs[catalogued], ys[catalogued], snr[catalogued]


def _whole_image(image):
    finder = DAOStarFinder(threshold=5 * NOISE_E, fwhm=FWHM_PX, exclude_border=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        table = finder(image)
    return np.column_stack([np.asarray(table["x_centroid"]), np.asarray(table["y_centroid"])])


def test_detections_near_each_star_are_the_whole_images():
    image, x, y, _ = _field()
    whole = _whole_image(image)
    finder = DAOStarFinder(threshold=5 * NOISE_E, fwhm=FWHM_PX, exclude_border=False)
    radius = 1.5
    around = _detect_around(image, x, y, finder, radius)
    # Each star's detections within radius + 1, whole image, as a multiset.
    expected = [
        tuple(d)
        for k in range(len(x))
        for d in whole[np.hypot(whole[:, 0] - x[k], whole[:, 1] - y[k]) <= radius + 1.0]
    ]
    assert len(expected) > 60  # the comparison is not empty
    got = sorted(map(tuple, np.round(around, 9)))
    assert got == sorted(map(tuple, np.round(np.array(expected), 9)))


@pytest.mark.parametrize("seed", [3, 4])
def test_match_equals_the_whole_image_match(seed):
    image, x, y, snr = _field(seed)
    qa = match_detections(image, x, y, snr, fwhm_px=FWHM_PX, noise_e=NOISE_E)
    whole = _whole_image(image)
    bright = snr >= 20
    dist, nearest = cKDTree(whole).query(np.column_stack([x[bright], y[bright]]))
    hit = dist <= 1.5
    dx = whole[nearest[hit], 0] - x[bright][hit]
    dy = whole[nearest[hit], 1] - y[bright][hit]
    _, _, rms = sigma_clipped_stats(np.r_[dx - np.median(dx), dy - np.median(dy)])
    assert 0.3 < hit.mean() < 1.0  # misses and hits both present
    assert qa.n_matched == hit.sum()
    assert qa.match_rate == hit.mean()
    assert qa.dx_median_px == pytest.approx(np.median(dx), rel=1e-12, abs=1e-12)
    assert qa.dy_median_px == pytest.approx(np.median(dy), rel=1e-12, abs=1e-12)
    assert qa.astrometric_rms_px == pytest.approx(rms, rel=1e-12)
