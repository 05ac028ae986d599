"""The zero-point network's baselines (ml/zp_baselines.py): the random forests
and seed 000's metrics, on simulated exposures whose true offset is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats
from statchecks import ALPHA, assert_fails

from ml.zp_baselines import FAILURE_MAG, ForestBaseline, LUTBaseline, regression_metrics
from sim.zpsim import DOMAINS, simulate_zp_exposures
from tasks.zp import features_from_simulation


@pytest.fixture(scope="module")
def split():
    """Twelve nights of domain A, 16 exposures each: (train, held-out) features,
    the last five nights held out (80 exposures)."""
    exps = simulate_zp_exposures(DOMAINS["A"], n_nights=12, exposures_per_night=16, patch_px=16)
    features = features_from_simulation(exps, patch_px=16, max_stars=24)
    held = np.isin(features.night, sorted(set(features.night))[-5:])
    return features.select(~held), features.select(held)


def check_forest_uses_the_catalog(train, held_out) -> None:
    """Given the classical zero point of the stars, the forest must beat the
    one without it, exposure by exposure (the telemetry cannot see clouds; the
    stars do): a one-sided Wilcoxon signed-rank test of the absolute errors at
    p < 1e-3 (ranks: a few cloudy exposures do not decide it)."""
    truth = held_out.target_mag
    plain = ForestBaseline(n_estimators=50).fit(train).predict(held_out)[0]
    with_catalog = ForestBaseline(inputs="classical", n_estimators=50).fit(train)
    better = np.abs(plain - truth) - np.abs(with_catalog.predict(held_out)[0] - truth)
    p = stats.wilcoxon(better, alternative="greater").pvalue
    assert p < ALPHA, p


def test_forest_with_the_catalog_zero_point_beats_the_forest_without(split):
    check_forest_uses_the_catalog(*split)


def test_forest_check_fails_when_the_catalog_column_is_shuffled(split):
    """The classical zero point handed to the forest permuted across exposures
    (train and held-out alike): it is then noise, and the forest that reads it
    must lose its advantage."""
    rng = np.random.default_rng(3)

    def shuffled(fs):
        perm = rng.permutation(len(fs))
        return dataclasses.replace(
            fs,
            catalog_zp_mag=fs.catalog_zp_mag[perm],
            catalog_zp_err_mag=fs.catalog_zp_err_mag[perm],
        )

    assert_fails(check_forest_uses_the_catalog, *(shuffled(fs) for fs in split))


def test_forest_uncertainty_is_the_spread_of_its_trees(split):
    train, held_out = split
    forest = ForestBaseline(inputs="classical", n_estimators=30, seed=4).fit(train)
    pred, sigma = forest.predict(held_out)
    assert pred.shape == sigma.shape == (len(held_out),)
    assert np.all(np.isfinite(pred))
    assert np.all(sigma > 0)
    # 30 trees, one seed: reproducible; another seed grows other trees.
    again = ForestBaseline(inputs="classical", n_estimators=30, seed=4).fit(train)
    np.testing.assert_array_equal(again.predict(held_out)[0], pred)
    other = ForestBaseline(inputs="classical", n_estimators=30, seed=5).fit(train)
    assert np.any(other.predict(held_out)[0] != pred)
    # Exposures the trees disagree on are the ones they get wrong: the error
    # grows with the spread (Spearman-like, on ranks).
    err = np.abs(pred - held_out.target_mag)
    r = np.corrcoef(np.argsort(np.argsort(sigma)), np.argsort(np.argsort(err)))[0, 1]
    assert r > 3.29 / np.sqrt(len(err)), r


def test_forest_leaves_out_rows_without_a_target(split):
    train, held_out = split
    blank = train.target_mag.copy()
    blank[::5] = np.nan
    partial = dataclasses.replace(train, target_mag=blank)
    kept = train.select(np.isfinite(blank))
    a = ForestBaseline(n_estimators=10).fit(partial).predict(held_out)[0]
    b = ForestBaseline(n_estimators=10).fit(kept).predict(held_out)[0]
    np.testing.assert_array_equal(a, b)


def test_baselines_refuse_to_predict_before_fit(split):
    _, held_out = split
    with pytest.raises(RuntimeError, match=r"ForestBaseline\.predict before fit"):
        ForestBaseline().predict(held_out)
    with pytest.raises(RuntimeError, match=r"LUTBaseline\.predict before fit"):
        LUTBaseline().predict(held_out)


def test_regression_metrics_on_known_errors():
    truth = np.linspace(-0.2, 0.1, 10)
    err = np.array([0.01, -0.01, 0.02, -0.02, 0.0, 0.0, 0.1, np.nan, 0.005, -0.005])
    sigma = np.full(10, 0.015)
    m = regression_metrics(truth + err, sigma, truth)
    err = err[np.isfinite(err)]
    assert m["n"] == 10
    assert m["valid"] == pytest.approx(0.9)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(err)))
    # One error beyond 0.05 mag and one missing answer: 2 of 10 fail.
    assert FAILURE_MAG == 0.05
    assert m["failure"] == pytest.approx(0.2)
    # |err| / sigma < 1 for 0, 0, +-0.005, +-0.01: 6 of the 9 answered.
    assert m["coverage68"] == pytest.approx(6 / 9)
    assert m["coverage95"] == pytest.approx(8 / 9)
