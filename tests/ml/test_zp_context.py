"""The clear-sky model and the night context of the zero-point network
(docs/zp_network.md): recovery of the clear-sky offset from classical zero
points alone, and a context that only ever looks back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ml.zp_clearsky import (
    ClearSkyModel,
    ClearSkyModels,
    clear_sky_design,
    fit_clear_sky_models,
    fit_clear_sky_of,
)
from ml.zp_context import attach_context, night_context
from ml.zp_features import CONTEXT_CHANNELS, TARGET_SCALE_MAG, FeatureSet
from sim.zpsim import DOMAINS, simulate_zp_exposures
from tasks.zp import features_from_simulation

C = {name: k for k, name in enumerate(CONTEXT_CHANNELS)}


@pytest.fixture(scope="module")
def nights() -> tuple[FeatureSet, np.ndarray]:
    """Twenty nights of domain A, 20 exposures each, and the true clouds."""
    exps = simulate_zp_exposures(DOMAINS["A"], n_nights=20, exposures_per_night=20, patch_px=8)
    return features_from_simulation(exps, patch_px=8, max_stars=8), np.array(
        [e.cloud_mag for e in exps]
    )


def test_clear_sky_fit_from_classical_zero_points_recovers_the_clear_offset(nights):
    fs, cloud = nights
    model = fit_clear_sky_of(fs)
    clear = cloud == 0
    err = model.evaluate(fs.telemetry) - fs.target_mag
    # Clear exposures sit on the model to the fit's precision: ~250 of them with
    # a few mmag each constrain 14 terms to ~1-2 mmag; the classical zero point
    # of one exposure is several mmag (the model must beat it, or it is useless).
    rmse = np.sqrt(np.mean(err[clear] ** 2))
    classical = np.sqrt(np.nanmean((fs.catalog_zp_mag - fs.target_mag)[clear] ** 2))
    assert rmse < 0.004
    assert rmse < 0.6 * classical
    # Clouded exposures are below it (clouds only take light) and cloudy nights
    # were left out of the fit.
    assert np.all(err[cloud > 0.05] > 0)
    clear_nights = len(np.unique(fs.night)) - len(np.unique(fs.night[cloud > 0]))
    assert 0.8 * clear_nights <= model.n_nights <= clear_nights


def test_clear_sky_models_round_trip_and_fall_back_to_the_pooled_one(nights):
    fs, _ = nights
    models = fit_clear_sky_models(fs)
    again = ClearSkyModels.from_dict(models.to_dict())
    np.testing.assert_array_equal(again.evaluate(fs), models.evaluate(fs))
    other = replace(fs, domain=np.full(len(fs), 2))  # an instrument with no model of its own
    np.testing.assert_array_equal(again.evaluate(other), models.pooled.evaluate(fs.telemetry))
    no_pooled = ClearSkyModels(models.by_domain, None)
    assert np.isnan(no_pooled.evaluate(other)).all()
    shifted = ClearSkyModel(models.pooled.coef + 0.01, 0.0, 1, 1)
    np.testing.assert_allclose(
        no_pooled.adapted(2, shifted).evaluate(other),
        models.pooled.evaluate(fs.telemetry) + 0.01 * clear_sky_design(fs.telemetry).sum(1),
    )


def test_a_domain_without_classical_zero_points_keeps_the_pooled_model(nights):
    """One exposure of a third instrument with a classical zero point is not a
    fit (it would raise): the instrument takes the pooled model; with two it
    gets its own, whose band intercept follows its zero points (shifted by
    30 mmag here, the rest shrunk to the pooled fit)."""
    fs, cloud = nights
    third = np.isin(fs.night, np.unique(fs.night)[:2])  # two nights of a third instrument
    domain = np.where(third, 2, fs.domain)
    lone = third & (np.cumsum(third) > 1)
    one = replace(fs, domain=domain, catalog_zp_mag=np.where(lone, np.nan, fs.catalog_zp_mag))
    models = fit_clear_sky_models(one)
    assert 2 not in models.by_domain
    rows = one.select(third)
    np.testing.assert_array_equal(models.evaluate(rows), models.pooled.evaluate(rows.telemetry))
    shifted = replace(fs, domain=domain, catalog_zp_mag=fs.catalog_zp_mag + 0.03 * third)
    own = fit_clear_sky_models(shifted)
    assert 2 in own.by_domain
    clear = third & (cloud == 0)
    gain = own.evaluate(shifted)[clear] - own.pooled.evaluate(fs.telemetry[clear])
    # ~27 mmag expected: the pooled fit, which holds the third instrument's 2
    # of 20 nights, takes ~3 of the 30; the bounds leave room for the shrunk
    # telemetry terms, and a fit that ignored the shift (0) or doubled it fails.
    assert 0.01 < float(np.median(gain)) < 0.035, np.median(gain)


def test_context_only_looks_back_and_ignores_the_input_order(nights):
    fs, _ = nights
    clear = fit_clear_sky_models(fs).evaluate(fs)
    ctx = night_context(fs, clear)
    # Latest first: the first exposure of a night has none, the second has one.
    first = np.array(
        [np.argmin(np.where(fs.night == n, fs.mjd, np.inf)) for n in np.unique(fs.night)]
    )
    assert np.all(ctx[first, :, C["valid"]] == 0)
    night0 = np.nonzero(fs.night == fs.night[0])[0]
    order = night0[np.argsort(fs.mjd[night0])]
    second, one = order[1], order[0]
    assert ctx[second, 0, C["valid"]] == 1
    assert ctx[second, 1, C["valid"]] == 0
    assert ctx[second, 0, C["residual"]] == pytest.approx(
        (fs.catalog_zp_mag[one] - clear[one]) / TARGET_SCALE_MAG, abs=1e-5
    )
    assert ctx[second, 0, C["dt_h"]] == pytest.approx((fs.mjd[second] - fs.mjd[one]) * 12, rel=1e-5)
    # A later exposure's zero point changes nothing before it, only after.
    changed = order[10]
    later = replace(
        fs, catalog_zp_mag=np.where(np.arange(len(fs)) == changed, 9.0, fs.catalog_zp_mag)
    )
    np.testing.assert_array_equal(night_context(later, clear)[order[:11]], ctx[order[:11]])
    assert not np.array_equal(night_context(later, clear)[order[11]], ctx[order[11]])
    # The order exposures come in does not matter, only their times.
    perm = np.random.default_rng(0).permutation(len(fs))
    np.testing.assert_array_equal(night_context(fs.select(perm), clear[perm]), ctx[perm])


def test_attached_context_survives_selection(nights):
    fs, _ = nights
    attached = attach_context(fs, fit_clear_sky_models(fs))
    rows = np.arange(len(fs))[::3]
    np.testing.assert_array_equal(attached.select(rows).context, attached.context[rows])
    assert np.isfinite(attached.clear_sky_mag).all()
    bare = attach_context(fs, None)
    assert np.isnan(bare.clear_sky_mag).all()
    # Without a clear-sky model the residuals are the zero points themselves.
    has = bare.context[..., C["has_zp"]] > 0
    assert np.all(bare.context[..., C["residual"]][has] < 0)
