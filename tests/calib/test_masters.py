"""Master frames: ccdproc equivalence, noise-floor recovery, defects, stability."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.nddata import CCDData
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2
from statchecks import assert_close_in_sigma, assert_fails

from calib.masters import (
    combine_frames,
    compare_bias,
    find_dead_pixels,
    find_hot_pixels,
    flat_ratio_stats,
    flat_residual_sigma,
)


def _ccdproc_combine(stack: np.ndarray):
    from ccdproc import Combiner

    combiner = Combiner([CCDData(f, unit="adu") for f in stack])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns that it clipped the NaNs
        combiner.sigma_clipping(low_thresh=3, high_thresh=3, func="mean", dev_func="std")
        return combiner.average_combine()


def _dirty_stack(seed: int, n: int = 12, shape=(40, 50)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stack = (1000.0 + rng.normal(0, 5.0, size=(n, *shape))).astype(np.float32)
    # Cosmic rays, single hot outliers, NaN and inf pixels, and a dead column.
    for _ in range(60):
        stack[rng.integers(n), rng.integers(shape[0]), rng.integers(shape[1])] += rng.uniform(
            50, 5e4
        )
    stack[
        rng.integers(n, size=30), rng.integers(shape[0], size=30), rng.integers(shape[1], size=30)
    ] = np.nan
    stack[0, 3, 4] = np.inf
    stack[1, 5, 6] = -np.inf
    stack[:, :, 7] = np.nan  # a pixel column with no valid value at all
    return stack


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ccdproc_mode_matches_ccdproc_to_1e6(seed):
    stack = _dirty_stack(seed)
    ours = combine_frames(stack, mode="ccdproc")
    peer = _ccdproc_combine(stack)
    both = np.isfinite(peer.data)
    assert np.array_equal(both, np.isfinite(ours.center))
    np.testing.assert_allclose(ours.center[both], peer.data[both], rtol=1e-6, atol=0)
    unc = peer.uncertainty.array
    ok = np.isfinite(unc)
    np.testing.assert_allclose(ours.uncertainty[ok], unc[ok], rtol=1e-6, atol=1e-12)
    assert np.array_equal(peer.mask, ours.nframes == 0)


def test_value_exactly_on_a_bound_is_kept_like_ccdproc():
    # 9 values of 0 and one of 3: mean 0.3, std 0.9, upper bound exactly 3.0.
    col = np.array([0.0] * 9 + [3.0])
    stack = np.tile(col[:, None, None], (1, 2, 2))
    ours = combine_frames(stack, mode="ccdproc")
    peer = _ccdproc_combine(stack)
    assert ours.nframes[0, 0] == 10
    assert ours.center[0, 0] == pytest.approx(peer.data[0, 0]) == pytest.approx(0.3)


@settings(max_examples=30, deadline=None, database=None)
@given(value=st.floats(-1e4, 1e4, allow_nan=False), n=st.integers(1, 15))
def test_identical_frames_combine_to_the_frame(value, n):
    stack = np.full((n, 3, 4), value, dtype=np.float32)
    for mode in ("ccdproc", "iterative", "median"):
        m = combine_frames(stack, mode=mode)
        np.testing.assert_array_equal(m.center, np.float32(value))
        assert np.all(m.nframes == n)
        assert np.all(m.sigma == 0)


def test_iterative_clipping_rejects_what_one_pass_misses():
    rng = np.random.default_rng(5)
    stack = rng.normal(0, 1.0, size=(20, 30, 30))
    # Two large outliers in one pixel inflate the one-pass std enough to save one.
    stack[0, :, :] += 25.0
    stack[1, :, :] += 12.0
    one = combine_frames(stack, mode="ccdproc")
    it = combine_frames(stack, mode="iterative")
    assert np.median(one.nframes) == 19
    assert np.median(it.nframes) == 18
    assert abs(np.mean(it.center)) < abs(np.mean(one.center))


def test_median_mode_uncertainty_matches_scatter_of_medians():
    rng = np.random.default_rng(9)
    stack = rng.normal(10.0, 2.0, size=(25, 60, 60))
    m = combine_frames(stack, mode="median")
    assert np.std(m.center) == pytest.approx(np.median(m.uncertainty), rel=0.1)
    assert np.median(m.sigma) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("mode", ["ccdproc", "iterative"])
def test_master_bias_reaches_the_read_noise_floor(mode):
    """Master minus truth has an rms within 10 % of read noise / sqrt(N)."""
    rng = np.random.default_rng(3)
    n, rn = 20, 1.4
    truth = rng.normal(0, 1.5, size=(64, 64))
    stack = truth + rng.normal(0, rn, size=(n, 64, 64))
    # Cosmic rays in biases are rare but happen: they must not cost precision.
    stack[rng.integers(n, size=40), rng.integers(64, size=40), rng.integers(64, size=40)] += 300.0
    m = combine_frames(stack, mode=mode)
    floor = rn / np.sqrt(n)
    resid = m.center - truth
    assert np.std(resid) == pytest.approx(floor, rel=0.10)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="frames"):
        combine_frames(np.ones((4, 4)))
    with pytest.raises(ValueError, match="mode"):
        combine_frames(np.ones((2, 4, 4)), mode="mean")
    with pytest.raises(ValueError, match="low_sigma"):
        combine_frames(np.ones((2, 4, 4)), low_sigma=0)
    with pytest.raises(ValueError, match="iterations"):
        combine_frames(np.ones((2, 4, 4)), iterations=0)
    with pytest.raises(TypeError, match="dtype"):
        combine_frames(np.full((2, 2, 2), "a"))


def test_hot_and_dead_pixels_found_without_false_alarms():
    rng = np.random.default_rng(11)
    shape = (256, 256)
    bias = rng.normal(0, 1.5, size=shape[1])[None, :] + rng.normal(0, 0.3, size=shape)
    flat = 1.0 + 0.01 * rng.standard_normal(shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    flat *= 1 - 0.04 * ((xx - 128) ** 2 + (yy - 128) ** 2) / 128**2  # vignetting
    flat *= 1 - 0.03 * (np.hypot(xx - 60, yy - 70) < 12)  # a dust donut
    hot = rng.choice(flat.size, 200, replace=False)
    dead = rng.choice(flat.size, 200, replace=False)
    bias.flat[hot] += rng.uniform(30, 2000, size=200)
    flat.flat[dead] *= rng.uniform(0, 0.5, size=200)
    found_hot = find_hot_pixels(bias)
    found_dead = find_dead_pixels(flat)
    assert found_hot.flat[hot].mean() >= 0.99
    assert found_dead.flat[dead].mean() >= 0.99
    assert (found_hot.sum() - found_hot.flat[hot].sum()) / flat.size < 1e-3
    assert (found_dead.sum() - found_dead.flat[dead].sum()) / flat.size < 1e-3


def test_bias_jump_between_periods_is_flagged():
    rng = np.random.default_rng(2)
    truth = rng.normal(0, 1.5, size=(128, 128))
    ref = combine_frames(truth + rng.normal(0, 1.4, size=(20, 128, 128)))
    same = combine_frames(truth + rng.normal(0, 1.4, size=(20, 128, 128)))
    jumped = combine_frames(truth + 2.0 + rng.normal(0, 1.4, size=(20, 128, 128)))
    _, stable = compare_bias(same, ref)
    delta, unstable = compare_bias(jumped, ref)
    assert not stable.flagged
    assert abs(stable.mean_delta_adu) < 0.05
    assert stable.outlier_fraction < 0.006
    assert unstable.flagged
    assert unstable.mean_delta_adu == pytest.approx(2.0, abs=0.05)
    assert delta.shape == (128, 128)


def _flat_ratio_case(daily_gain: float = 1.0):
    """Ten frames of a 1 %-structured flat at 1.5e5 e-, their master, and one
    daily flat (scaled by ``daily_gain``, 1 for the truth)."""
    rng = np.random.default_rng(4)
    n, level = 10, 1.5e5
    truth = 1.0 + 0.01 * rng.standard_normal((100, 100))
    frames = rng.poisson(level * truth, size=(n, 100, 100)) / level
    daily = daily_gain * rng.poisson(level * truth) / level
    return frames, daily, n, level


def check_flat_ratio_stats(frames, daily, n, level) -> None:
    sigma = flat_residual_sigma(frames)
    # sigma_i is the population rms of n frames (seed 004): its median over pixels
    # is sqrt(median(chi2_{n-1}) / n) = 0.91 of the photon noise, known to ~0.3 %
    # from 1e4 pixels.
    expected = np.sqrt(chi2.median(n - 1) / n) / np.sqrt(level)
    assert np.median(sigma) == pytest.approx(expected, rel=0.02)
    master = combine_frames(frames).center
    ratio, stats = flat_ratio_stats(daily, master, expected_sigma=1 / np.sqrt(level))
    # Per pixel the ratio scatters by sqrt((1 + 1/n) / level) = 2.7e-3; the median
    # of 1e4 pixels by 1.2533 x that / 100 = 3.4e-5, and a MAD-based rms by
    # 1.17 / sqrt(1e4) = 1.2 % of itself (its efficiency is 37 %).
    rms = np.sqrt((1 + 1 / n) / level)
    npix = ratio.size
    assert_close_in_sigma(stats.median, 1.0, 1.2533 * rms / np.sqrt(npix), label="median")
    assert_close_in_sigma(stats.robust_rms, rms, 1.17 * rms / np.sqrt(npix), label="robust rms")
    assert stats.outlier_fraction < 1e-3
    assert ratio.dtype == np.float32


def test_flat_ratio_and_residual_sigma_follow_photon_noise():
    check_flat_ratio_stats(*_flat_ratio_case())


@pytest.mark.parametrize("daily_gain", [1.0005, 0.9995], ids=["+0.05%", "-0.05%"])
def test_flat_ratio_median_catches_a_0p05_percent_change(daily_gain):
    """A daily flat 0.05 % off (15 sigma of the median): the check must fail."""
    assert_fails(check_flat_ratio_stats, *_flat_ratio_case(daily_gain))


def test_flat_ratio_rms_catches_extra_noise():
    """Daily flats with 10 % more noise than photon noise: the rms check fails."""
    frames, daily, n, level = _flat_ratio_case()
    rng = np.random.default_rng(8)
    noisy = daily + rng.normal(0, 0.46 / np.sqrt(level), daily.shape)
    assert_fails(check_flat_ratio_stats, frames, noisy, n, level)
