"""The compiled filters return scipy.ndimage's values bit for bit (they replace
it on the hot path: docs/photometry.md, "Compiled speed")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from calib._filters import dilate_cross, dilate_square, uniform_filter

SHAPES = [(1, 9), (7, 5), (64, 3), (3, 64), (50, 41)]


def _image(shape, seed):
    # Values over 8 decades and both signs: rounding in the running sums shows.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 10 ** rng.uniform(-3, 5, size=shape)).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("size", "mode"), [(3, "reflect"), (5, "nearest"), (5, "reflect"), (9, "nearest")]
)
def test_uniform_filter_equals_scipy_bits(shape, size, mode):
    image = _image(shape, seed=size)
    np.testing.assert_array_equal(
        uniform_filter(image, size, mode=mode), ndimage.uniform_filter(image, size, mode=mode)
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_dilations_equal_scipy(shape):
    rng = np.random.default_rng(1)
    mask = rng.random(shape) > 0.95
    mask[0, 0] = mask[-1, -1] = True  # corners: the border is 0, not reflected
    for iterations in (1, 2, 3):
        np.testing.assert_array_equal(
            dilate_cross(mask, iterations), ndimage.binary_dilation(mask, iterations=iterations)
        )
    np.testing.assert_array_equal(
        dilate_square(mask), ndimage.binary_dilation(mask, np.ones((3, 3), bool))
    )
    np.testing.assert_array_equal(dilate_cross(mask, 0), mask)


def test_filters_reject_what_they_do_not_reproduce():
    with pytest.raises(TypeError, match="float32"):
        uniform_filter(np.zeros((4, 4)), 3)
    with pytest.raises(ValueError, match="mode"):
        uniform_filter(np.zeros((4, 4), np.float32), 3, mode="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        dilate_cross(np.zeros(4, bool), 1)
