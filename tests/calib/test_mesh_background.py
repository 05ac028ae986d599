"""The vectorised mesh statistics are photutils' Background2D meshes, bit for bit
(calib.photometry._mesh replaces Background2D in estimate_background)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.stats import SigmaClip
from photutils.background import (
    Background2D,
    MeanBackground,
    MedianBackground,
    StdBackgroundRMS,
)

from calib.photometry._mesh import mesh_statistics


def _background2d(image, mask, box, filter_size, estimator):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkg = Background2D(
            image,
            box,
            mask=mask,
            filter_size=(filter_size, filter_size),
            sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
            bkg_estimator=MeanBackground() if estimator == "mean" else MedianBackground(),
            bkg_rms_estimator=StdBackgroundRMS(),
            exclude_percentile=80.0,
        )
        return bkg.background_mesh, bkg.background_rms_mesh


# Whole meshes only; a row and a column of partial meshes with a corner (kept:
# more than 20 % of a mesh); partial meshes too thin to keep (filled by IDW).
CASES = [
    ((128, 128), (64, 64)),
    ((100, 90), (32, 32)),
    ((77, 130), (16, 24)),
    ((70, 300), (64, 64)),
]


@pytest.mark.parametrize(("shape", "box"), CASES)
@pytest.mark.parametrize("estimator", ["mean", "median"])
@pytest.mark.parametrize("filter_size", [1, 3])
def test_mesh_statistics_equal_background2d(shape, box, estimator, filter_size):
    rng = np.random.default_rng(sum(shape) + filter_size)
    # Sky, noise, and a tail of sources for the clipping to remove.
    image = 100.0 + rng.normal(0.0, 10.0, shape)
    image += (rng.random(shape) < 0.03) * rng.exponential(500.0, shape)
    image = image.astype(np.float32)
    image[5, 7] = np.nan  # non-finite pixels are ignored, as Background2D ignores them
    mask = rng.random(shape) < 0.1
    mask[: box[0], : box[1]] |= rng.random(box) < 0.9  # one excluded mesh, filled by IDW
    ours = mesh_statistics(
        image, mask, box, filter_size=filter_size, clip_sigma=3.0, estimator=estimator
    )
    level, rms = _background2d(image, mask, box, filter_size, estimator)
    np.testing.assert_array_equal(ours.background, level)
    np.testing.assert_array_equal(ours.rms, rms)


def test_mesh_statistics_refuse_a_fully_masked_image():
    image = np.ones((64, 64), np.float32)
    with pytest.raises(ValueError, match="every pixel is masked"):
        mesh_statistics(image, np.ones(image.shape, bool), (32, 32), filter_size=3,
                        clip_sigma=3.0, estimator="mean")  # fmt: skip
    mask = np.zeros(image.shape, bool)
    mask[:, 1::2] = mask[1::2, :] = True  # 75 % of every mesh
    mask[:, ::4] = True
    with pytest.raises(ValueError, match="mesh has more than 80"):
        mesh_statistics(image, mask, (32, 32), filter_size=3, clip_sigma=3.0, estimator="mean")
