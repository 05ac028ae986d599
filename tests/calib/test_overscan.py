import numpy as np
import pytest

from calib.overscan import overscan_level, subtract_overscan


def test_median_per_row_removes_row_noise_common_to_data_and_overscan():
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 3.0, size=(50, 1))
    data = 1000 + rows + rng.normal(0, 0.1, size=(50, 40))
    overscan = 1000 + rows + rng.normal(0, 0.1, size=(50, 8))
    per_row = subtract_overscan(data, overscan, method="median_per_row")
    single = subtract_overscan(data, overscan, method="median")
    assert per_row.dtype == np.float32
    assert per_row.std() < 0.2 < single.std()
    assert abs(per_row.mean()) < 0.05


@pytest.mark.parametrize("method", ["mean", "median"])
def test_single_level_methods(method):
    overscan = np.array([[1.0, 2.0, 9.0], [1.0, 2.0, 3.0]])
    level = overscan_level(overscan, method=method)
    assert level.shape == (2, 1)
    expected = overscan.mean() if method == "mean" else np.median(overscan)
    assert np.all(level == expected)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="method"):
        overscan_level(np.ones((3, 2)), method="mode")
    with pytest.raises(ValueError, match="overscan"):
        overscan_level(np.ones(3))
    with pytest.raises(ValueError, match="same rows"):
        subtract_overscan(np.ones((3, 4)), np.ones((2, 2)))
