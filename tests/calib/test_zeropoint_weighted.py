"""The weighted classical zero point: recovery with honest errors from star
lists that mix bright and faint stars, the extra scatter it measures, and
variables it clips."""

from __future__ import annotations

import numpy as np
import pytest

from calib.zeropoint import classical_zeropoints, extra_scatter


def _field(seed, *, n_groups=400, floor=0.005, variable_fraction=0.03):
    """Groups of 5..60 stars from 15th to 21st magnitude: photon errors from
    2 mmag to 0.15 mag, a per-star floor, a few variables 0.1-0.5 mag off."""
    rng = np.random.default_rng(seed)
    zp_true = rng.normal(25.0, 0.1, n_groups)
    cols = []
    for g in range(n_groups):
        n = int(rng.integers(5, 60))
        m = rng.uniform(15.0, 21.0, n)
        err = 0.002 + 0.15 * 10 ** (0.4 * (m - 21.0))
        m_inst = m - zp_true[g] + rng.normal(0, 1, n) * np.hypot(err, floor)
        variable = rng.uniform(size=n) < variable_fraction
        m_inst[variable] += rng.choice([-1, 1], variable.sum()) * rng.uniform(
            0.1, 0.5, variable.sum()
        )
        cols.append((np.full(n, g), m_inst, m, err))
    group, m_inst, m_ref, err = (np.concatenate(c) for c in zip(*cols, strict=True))
    return zp_true, group, m_inst, m_ref, err


def test_weighted_zero_points_have_honest_errors_and_beat_the_median():
    zp_true, group, m_inst, m_ref, err = _field(3)
    kw = {"m_inst_err": err, "colour_term": 0.0}
    colour = np.zeros(len(group))
    weighted = classical_zeropoints(m_inst, m_ref, colour, group, **kw, estimator="weighted")
    median = classical_zeropoints(m_inst, m_ref, colour, group, **kw)
    ok = np.isfinite(weighted.zp) & np.isfinite(median.zp)
    assert ok.sum() >= 395  # a 5-star group can lose all but two to clipping
    e_w = (weighted.zp - zp_true[weighted.group])[ok]
    e_m = (median.zp - zp_true[median.group])[ok]
    # 400 groups: the pull rms is known to ~1/sqrt(2 x 400) = 3.5 %; 4 sigma.
    pull = e_w / weighted.zp_err[ok]
    assert 0.86 < np.sqrt(np.mean(pull**2)) < 1.14
    assert abs(np.mean(pull)) < 4 / np.sqrt(len(pull))
    # The median spends the bright stars' weight on faint ones: a weighted mean
    # of these lists is about twice as precise (the exact factor depends on the
    # magnitude mix; 0.75 leaves room for the noise of 400 groups).
    assert np.sqrt(np.mean(e_w**2)) < 0.75 * np.sqrt(np.mean(e_m**2))
    # The 5 mmag floor is found (the ML estimate of 20 000 stars is good to a
    # few per cent; the variables left after clipping push it up a little).
    assert weighted.extra_scatter == pytest.approx(0.005, rel=0.2)
    assert np.isnan(median.extra_scatter)


def test_a_bright_variable_is_clipped_not_averaged():
    rng = np.random.default_rng(0)
    n = 30
    m_ref = rng.uniform(16, 20, (50, n))
    err = np.full((50, n), 0.01)
    m_inst = m_ref - 25.0 + rng.normal(0, 0.01, (50, n))
    m_inst[:, 0] += 0.2  # one star per group is 0.2 mag off, with the smallest error
    err[:, 0] = 0.002
    group = np.repeat(np.arange(50), n)
    res = classical_zeropoints(
        m_inst.ravel(), m_ref.ravel(), np.zeros(50 * n), group,
        m_inst_err=err.ravel(), colour_term=0.0, estimator="weighted",
    )  # fmt: skip
    # 29 good stars of 10 mmag: 1.9 mmag per group; 5 sigma.
    np.testing.assert_allclose(res.zp, 25.0, atol=0.0095)
    # The variable is always out; a 3-sigma clip takes a good star now and then.
    assert np.all(res.n_stars <= n - 1)
    assert np.mean(res.n_stars) > n - 1.1


def test_extra_scatter_recovers_a_known_floor_and_zero():
    rng = np.random.default_rng(1)
    stated = rng.uniform(0.001, 0.1, 20_000)
    resid = rng.normal(0, 1, stated.size) * np.hypot(stated, 0.004)
    # Bright stars carry the information: ~2,000 below 10 mmag; 10 % is ~4 sigma.
    assert extra_scatter(resid, stated**2) == pytest.approx(0.004, rel=0.1)
    honest = rng.normal(0, 1, stated.size) * stated * 0.95
    assert extra_scatter(honest, stated**2) == 0.0


def test_weighted_needs_errors_and_a_known_estimator():
    x = np.zeros(6)
    with pytest.raises(ValueError, match="needs per-star errors"):
        classical_zeropoints(x, x, x, np.zeros(6, int), estimator="weighted")
    with pytest.raises(ValueError, match="estimator"):
        classical_zeropoints(x, x, x, np.zeros(6, int), estimator="mean")  # type: ignore[arg-type]
