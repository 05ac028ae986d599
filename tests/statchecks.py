"""Tolerances from the noise, shared by the science tests.

A science test states what a claim predicts (pulls of unit width, a mean of
zero, a slope of one) and how far the data may stray by chance. The chance part
comes from the sample itself: the standard error of a mean, the chi-square band
of a standard deviation. ``ALPHA`` is the false-alarm probability of each
two-sided check; the inputs are seeded, so a check that passes always passes,
and one that fails says the claim or its error model is wrong.

The negative tests (``assert_fails``) run the same checks on perturbed code or
output and require them to fail: a check that cannot fail guards nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import pytest
from scipy import stats

ALPHA = 1e-3
"""Two-sided false-alarm probability of one check (3.3 sigma for a Gaussian)."""


def z_score(alpha: float = ALPHA) -> float:
    """Two-sided Gaussian quantile: 3.29 for ``alpha = 1e-3``."""
    return float(stats.norm.isf(alpha / 2))


def std_band(n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Range of the sample standard deviation (ddof=1) of ``n`` unit Gaussian
    values, from the chi-square distribution with n - 1 degrees of freedom."""
    if n < 3:
        raise ValueError(f"need at least 3 values for a width, got {n}")
    dof = n - 1
    lo = np.sqrt(stats.chi2.ppf(alpha / 2, dof) / dof)
    hi = np.sqrt(stats.chi2.isf(alpha / 2, dof) / dof)
    return float(lo), float(hi)


def rms_band(n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Range of the rms (about zero, no mean removed) of ``n`` unit Gaussians."""
    lo = np.sqrt(stats.chi2.ppf(alpha / 2, n) / n)
    hi = np.sqrt(stats.chi2.isf(alpha / 2, n) / n)
    return float(lo), float(hi)


def assert_unit_pulls(
    pulls: np.ndarray,
    *,
    centred: bool = True,
    alpha: float = ALPHA,
    width_slack: float = 0.0,
    label: str = "pulls",
) -> None:
    """Two-sided: the pulls' width lies in the chi-square band of unit Gaussians
    (widened by ``width_slack`` on each side, for a stated model error), and,
    with ``centred``, their mean is zero within its standard error."""
    pulls = np.asarray(pulls, dtype=np.float64)
    pulls = pulls[np.isfinite(pulls)]
    n = len(pulls)
    lo, hi = std_band(n, alpha)
    lo, hi = lo - width_slack, hi + width_slack
    width = float(np.std(pulls, ddof=1))
    assert lo < width < hi, f"{label}: width {width:.3f} outside [{lo:.3f}, {hi:.3f}] (n={n})"
    if centred:
        bound = z_score(alpha) * max(width, 1.0) / np.sqrt(n)
        mean = float(np.mean(pulls))
        assert abs(mean) < bound, f"{label}: mean {mean:+.3f}, bound {bound:.3f} (n={n})"


def assert_rms_unit(pulls: np.ndarray, *, alpha: float = ALPHA, label: str = "pulls") -> None:
    """Two-sided: the rms of pulls about zero lies in its chi-square band."""
    pulls = np.asarray(pulls, dtype=np.float64)
    pulls = pulls[np.isfinite(pulls)]
    lo, hi = rms_band(len(pulls), alpha)
    rms = float(np.sqrt(np.mean(pulls**2)))
    assert lo < rms < hi, f"{label}: rms {rms:.3f} outside [{lo:.3f}, {hi:.3f}] (n={len(pulls)})"


def assert_close_in_sigma(
    value: float, expected: float, sigma: float, *, alpha: float = ALPHA, label: str = "value"
) -> None:
    """|value - expected| within z(alpha) standard errors."""
    bound = z_score(alpha) * sigma
    assert abs(value - expected) < bound, (
        f"{label}: {value:.5g}, expected {expected:.5g} +- {bound:.3g} ({z_score(alpha):.2f} sigma)"
    )


def weighted_slope(x: np.ndarray, y: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares slope of y on x and its standard error, the
    error scaled by the fit's reduced chi-square when that exceeds 1 (scatter
    beyond the stated errors widens the error, never narrows it)."""
    x, y, w = (np.asarray(a, dtype=np.float64) for a in (x, y, 1.0 / np.asarray(sigma) ** 2))
    xm = np.sum(w * x) / np.sum(w)
    ym = np.sum(w * y) / np.sum(w)
    sxx = np.sum(w * (x - xm) ** 2)
    slope = np.sum(w * (x - xm) * (y - ym)) / sxx
    resid = y - ym - slope * (x - xm)
    chi2 = float(np.sum(w * resid**2) / (len(x) - 2))
    return float(slope), float(np.sqrt(max(chi2, 1.0) / sxx))


@contextmanager
def fails(reason: str = ""):
    """The checks inside must raise AssertionError (a negative test)."""
    with pytest.raises(AssertionError) as info:
        yield info
    if reason:
        info.value.add_note(f"perturbation: {reason}")


def assert_fails(check: Callable[..., object], *args: object, **kwargs: object) -> str:
    """Run ``check`` and require an AssertionError; returns its message."""
    with pytest.raises(AssertionError) as info:
        check(*args, **kwargs)
    return str(info.value)
