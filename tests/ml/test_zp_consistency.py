"""The scoring night's check of the network against its own stars
(ml.zp_train.stars_consistency): intervals that are right stay as they are;
intervals too narrow for the night are widened until the network's errors
against the truth have unit width."""

from __future__ import annotations

import numpy as np
import pytest
from statchecks import assert_fails, assert_unit_pulls

from ml.zp_train import stars_consistency

N = 400
CATALOG_ERR = 0.008  # mag: the stars' classical zero point, honest


def _night(true_sigma: float, claimed_sigma: float, seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.normal(-0.15, 0.05, N)
    catalog = truth + rng.normal(0.0, CATALOG_ERR, N)
    offset = truth + rng.normal(0.0, true_sigma, N)
    return truth, offset, np.full(N, claimed_sigma), catalog, np.full(N, CATALOG_ERR)


@pytest.mark.parametrize("seed", range(3))
def test_honest_intervals_are_left_alone(seed):
    _truth, offset, sigma, catalog, cerr = _night(0.017, 0.017, seed)
    check = stars_consistency(offset, sigma, catalog, cerr)
    assert check.dof == N
    assert check.factor == 1.0, check
    assert check.p_value > 0.01


@pytest.mark.parametrize("true_sigma", [0.03, 0.045])
def test_too_narrow_intervals_are_widened_to_unit_pulls(true_sigma):
    truth, offset, sigma, catalog, cerr = _night(true_sigma, 0.017, 7)
    check = stars_consistency(offset, sigma, catalog, cerr)
    assert check.p_value < 1e-6
    pulls = (offset - truth) / (sigma * check.factor)
    assert_unit_pulls(pulls, label="widened network pulls")
    assert_fails(assert_unit_pulls, (offset - truth) / sigma)  # as the network claimed


def test_exposures_without_stars_are_not_counted():
    _truth, offset, sigma, catalog, cerr = _night(0.017, 0.017, 1)
    catalog[:100] = np.nan
    cerr[100:150] = 0.0
    assert stars_consistency(offset, sigma, catalog, cerr).dof == N - 150
    none = stars_consistency(offset, sigma, np.full(N, np.nan), cerr)
    assert (none.dof, none.factor) == (0, 1.0)
