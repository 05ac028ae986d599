"""Classical zero points: recovery of known zero points and colour term from
synthetic star lists, with honest errors (pull rms near 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.bits import FLAG_BITS
from calib.zeropoint import (
    classical_zeropoints,
    fit_colour_term,
    median_variance_factor,
    zeropoint_stars,
)


def _stars(seed, *, n_groups=300, per_group=(3, 12), colour_term=0.05, extra=0.01):
    rng = np.random.default_rng(seed)
    zp_true = rng.normal(25.0, 0.2, n_groups)
    rows = []
    for g in range(n_groups):
        n = rng.integers(*per_group)
        colour = rng.normal(1.0, 0.45, n)
        m_true = rng.uniform(14, 19, n)
        err_inst = 0.003 + 0.02 * 10 ** (0.4 * (m_true - 19))
        err_ref = np.full(n, 0.004)
        m_ref = m_true - colour_term * (colour - 1.0) + rng.normal(0, err_ref)
        m_inst = m_true - zp_true[g] + rng.normal(0, err_inst) + rng.normal(0, extra, n)
        # An outlier now and then: a variable star.
        m_inst[rng.uniform(size=n) < 0.03] -= 0.3
        rows.append((np.full(n, g), m_inst, m_ref, colour, err_inst, err_ref))
    cols = [np.concatenate(c) for c in zip(*rows, strict=True)]
    return zp_true, cols


def test_zero_points_and_colour_term_recovered_with_honest_errors():
    zp_true, (group, m_inst, m_ref, colour, err_inst, err_ref) = _stars(1)
    res = classical_zeropoints(m_inst, m_ref, colour, group, m_inst_err=err_inst, m_ref_err=err_ref)
    assert res.colour_term.value == pytest.approx(0.05, abs=3 * res.colour_term.err)
    ok = np.isfinite(res.zp)
    pull = (res.zp[ok] - zp_true[res.group[ok]]) / res.zp_err[ok]
    assert ok.sum() > 250
    assert 0.85 < np.sqrt(np.mean(pull**2)) < 1.15
    assert abs(np.mean(pull)) < 0.2


def test_errors_from_the_scatter_when_star_errors_are_absent():
    zp_true, (group, m_inst, m_ref, colour, _, _) = _stars(2, per_group=(8, 20))
    res = classical_zeropoints(m_inst, m_ref, colour, group, colour_term=0.05)
    assert not res.colour_term.fitted
    ok = np.isfinite(res.zp)
    pull = (res.zp[ok] - zp_true[res.group[ok]]) / res.zp_err[ok]
    # A sample scatter from ~10 stars is itself noisy: the pulls have heavy
    # (Student-t) tails, so judge their robust width (why the stage passes the
    # star errors, as in the test above).
    robust = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.8 < robust < 1.3, robust


def test_too_few_stars_give_nan():
    res = classical_zeropoints(
        np.array([1.0, 1.1, 2.0]), np.array([26.0, 26.1, 27.0]), np.ones(3),
        np.array([0, 0, 1]), colour_term=0.0, min_stars=3,
    )  # fmt: skip
    assert np.all(np.isnan(res.zp))
    np.testing.assert_array_equal(res.n_stars, [2, 1])


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-5, 5), term=st.floats(-0.2, 0.2))
def test_colour_term_is_invariant_to_zero_points(shift, term):
    """Adding any zero point per group changes nothing in the colour term."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(20), 10)
    colour = rng.normal(1.0, 0.5, group.size)
    delta = rng.normal(0, 0.01, group.size) - term * (colour - 1.0)
    a = fit_colour_term(delta, colour, group)
    b = fit_colour_term(delta + shift * (group % 3), colour, group)
    assert a.value == pytest.approx(b.value, abs=1e-9)
    assert a.value == pytest.approx(term, abs=0.01)


def test_median_variance_factor():
    assert median_variance_factor(1) == 1.0
    assert median_variance_factor(3) == pytest.approx(1.35, abs=0.03)
    assert median_variance_factor(1000) == pytest.approx(np.pi / 2)
    with pytest.raises(ValueError, match="n must be"):
        median_variance_factor(0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="1-D of one length"):
        classical_zeropoints(np.ones(3), np.ones(2), np.ones(3), np.zeros(3))


def test_too_few_stars_for_a_colour_term_apply_none():
    _, (group, m_inst, m_ref, colour, _, _) = _stars(3, n_groups=2)
    res = classical_zeropoints(m_inst, m_ref, colour, group, min_colour_stars=50)
    assert not res.colour_term.fitted
    assert res.colour_term.value == 0.0
    assert np.isnan(res.colour_term.err)


def test_zeropoint_stars_keep_clean_and_mildly_crowded_precise_stars():
    crowded, edge = FLAG_BITS["crowded"], FLAG_BITS["edge"]
    flags = np.array([0, crowded, crowded, edge, 0, edge | crowded])
    contamination = np.array([0.0, 0.005, 0.02, 0.0, 0.0, 0.0])
    err = np.array([0.01, 0.01, 0.01, 0.01, 0.08, 0.01])
    use = zeropoint_stars(flags, contamination, err, max_contamination=0.01, max_mag_err=0.05)
    assert use.tolist() == [True, True, False, False, False, False]
    looser = zeropoint_stars(flags, contamination, err, max_contamination=0.05, max_mag_err=0.1)
    assert looser.tolist() == [True, True, True, False, True, False]


def test_colour_term_ignores_single_star_groups_rounding():
    """Groups of one star carry no slope information: their residuals are zero but
    for rounding, and once set the clipping scale, so a 1e-15 change of the
    magnitudes moved the colour term by 1 % and its error by 45 % on tiny."""
    rng = np.random.default_rng(4)
    n_multi, per, n_single, term = 30, 4, 300, 0.05
    group = np.r_[np.repeat(np.arange(n_multi), per), n_multi + np.arange(n_single)]
    colour = rng.normal(1.0, 0.4, len(group))
    zp = rng.normal(25.0, 0.1, n_multi + n_single)[group]
    delta = zp - term * (colour - 1.0) + rng.normal(0.0, 0.01, len(group))
    err = np.full(len(group), 0.01)
    fit = fit_colour_term(delta, colour, group, delta_err=err)
    assert fit.value == pytest.approx(term, abs=4 * fit.err)
    nudged = fit_colour_term(delta * (1 + 1e-15 * rng.standard_normal(len(delta))), colour,
                             group, delta_err=err)  # fmt: skip
    assert nudged.value == pytest.approx(fit.value, rel=1e-9)
    assert nudged.err == pytest.approx(fit.err, rel=1e-9)
    # Single stars are never clipped: they do not enter the slope.
    assert n_single < fit.n_stars <= len(group)
