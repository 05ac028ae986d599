"""The stars' zero points of ml/zp_features.py: the plane fit with the night's
gradient prior against the weighted mean of the same stars (docs/zp_network.md).

Nights are drawn star by star with a known zero point at the quadrant centre
and, on cloudy nights, a known gradient per exposure; tolerances come from the
number of exposures (a pull rms over n exposures scatters by 1/sqrt(2n))."""

from __future__ import annotations

import numpy as np
import pytest

from ml.zp_features import star_zero_points

N_NIGHTS, N_EXP, N_STARS = 8, 24, 30
GRADIENT_MAG = 0.015


def _night(rng: np.random.Generator, gradient_mag: float) -> tuple[list[np.ndarray], ...]:
    """A night's stars (offset, error, x, y per exposure) and the truth at the centre."""
    offsets, errs, xs, ys, truth = [], [], [], [], []
    for _ in range(N_EXP):
        zp = rng.uniform(-0.3, 0.0)
        g = rng.normal(0.0, gradient_mag, size=2)
        x, y = rng.uniform(-1.0, 1.0, size=(2, N_STARS))
        err = np.exp(rng.uniform(np.log(0.002), np.log(0.05), size=N_STARS))
        offsets.append(zp + g[0] * x + g[1] * y + rng.normal(0.0, err))
        errs.append(err)
        xs.append(x)
        ys.append(y)
        truth.append(zp)
    return offsets, errs, xs, ys, [np.array(truth)]


def _survey(gradient_mag: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = ("truth", "classical", "c_err", "plane", "p_err")
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _ in range(N_NIGHTS):
        *stars, (truth,) = _night(rng, gradient_mag)
        zps = star_zero_points(*stars)
        for key, value in (
            ("truth", truth), ("classical", zps.classical), ("c_err", zps.classical_err),
            ("plane", zps.plane), ("p_err", zps.plane_err),
        ):  # fmt: skip
            out[key].append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a**2)))


PULL_TOL = 3.0 / np.sqrt(2 * N_NIGHTS * N_EXP)


@pytest.mark.parametrize("seed", [0, 1])
def test_plane_removes_a_cloud_gradient_with_honest_errors(seed):
    s = _survey(GRADIENT_MAG, seed)
    assert np.isfinite(s["plane"]).all()
    plane, classical = _rms(s["plane"] - s["truth"]), _rms(s["classical"] - s["truth"])
    # The weighted mean carries the gradient times its weighted centroid.
    assert plane < 0.8 * classical, (plane, classical)
    assert abs(_rms((s["plane"] - s["truth"]) / s["p_err"]) - 1.0) < PULL_TOL + 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_plane_is_the_weighted_mean_on_a_night_without_gradients(seed):
    s = _survey(0.0, seed)
    plane, classical = _rms(s["plane"] - s["truth"]), _rms(s["classical"] - s["truth"])
    # The prior learnt from gradient-free exposures gives the weighted mean back
    # (a free plane sits 0.47 of the mean's error from it here, and 5 % worse).
    assert plane < 1.05 * classical, (plane, classical)
    assert _rms((s["plane"] - s["classical"]) / s["c_err"]) < 0.3
    assert abs(_rms((s["plane"] - s["truth"]) / s["p_err"]) - 1.0) < PULL_TOL + 0.05
