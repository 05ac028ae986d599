"""How AZP-RC makes its answer (docs/zp_network.md): a precision-weighted mean
of the stars' estimate and the night-context estimate, and intervals
calibrated per regime on validation nights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ml.zp_clearsky import fit_clear_sky_models
from ml.zp_context import attach_context, attach_context_out_of_night
from ml.zp_features import TARGET_SCALE_MAG, FeatureSet
from ml.zp_model import _HEAD_CONTEXT_LOG_VAR, AZPRC, ESTIMATES, AZPRCConfig
from ml.zp_train import _tensors, calibrate_uncertainty, predict_intervals
from sim.zpsim import DOMAINS, simulate_zp_exposures
from tasks.zp import features_from_simulation

SMALL = AZPRCConfig(patch_px=8, cnn_channels=(4, 8), cnn_out=8, gru_hidden=8, catalog_out=8,
                    telemetry_hidden=8, summary_hidden=8, context_hidden=8,
                    fusion=(16, 8, 8))  # fmt: skip


@pytest.fixture(scope="module")
def features() -> FeatureSet:
    """Twelve nights of domain A, 24 exposures each, with context attached."""
    exps = simulate_zp_exposures(DOMAINS["A"], n_nights=12, exposures_per_night=24, patch_px=8)
    fs = features_from_simulation(exps, patch_px=8, max_stars=8)
    return attach_context(fs, fit_clear_sky_models(fs))


def _parts(model: AZPRC, fs: FeatureSet):
    with torch.no_grad():
        return model.forward_parts(*_tensors(fs, np.arange(len(fs)), torch.device("cpu")))


def test_answer_is_the_precision_weighted_mean_of_stars_and_context(features):
    torch.manual_seed(0)
    model = AZPRC(SMALL).eval()
    classical = features.catalog_zp_mag / TARGET_SCALE_MAG
    only_classical = (
        np.isfinite(classical) & np.isnan(features.plane_zp_mag) & np.isnan(features.sparse_zp_mag)
    )
    # With the context's variance made huge, the answer is the stars' estimate.
    with torch.no_grad():
        model.head.bias[_HEAD_CONTEXT_LOG_VAR] = 6.0
    parts = _parts(model, features)
    np.testing.assert_allclose(
        parts.offset.numpy()[only_classical], classical[only_classical], atol=2e-3
    )
    # With it tiny, mostly the context estimate; and always the weighted mean
    # of the estimates with the weights reported (the correction starts at 0).
    with torch.no_grad():
        model.head.bias[_HEAD_CONTEXT_LOG_VAR] = -14.0
    parts = _parts(model, features)
    context = parts.context.numpy()
    has = np.isfinite(context)
    assert has.mean() > 0.9
    assert np.median(parts.weights.numpy()[has, 3]) > 0.95
    estimates = (
        np.column_stack([features.catalog_zp_mag, features.plane_zp_mag, features.sparse_zp_mag])
        / TARGET_SCALE_MAG
    )
    estimates = np.nan_to_num(np.column_stack([estimates, context]))
    np.testing.assert_allclose(
        parts.offset.numpy(), (parts.weights.numpy() * estimates).sum(1), atol=1e-4
    )
    # Weights are a distribution over the estimates present.
    np.testing.assert_allclose(parts.weights.sum(1).numpy(), 1.0, atol=1e-5)
    assert parts.weights.shape[1] == len(ESTIMATES)


def test_intervals_are_calibrated_per_regime_on_the_validation_nights(features):
    torch.manual_seed(1)
    model = AZPRC(SMALL).eval()
    scales, tails = calibrate_uncertainty(model, features)
    pred, sigma, half95 = predict_intervals(model, features)
    regime = _parts(model, features).regime.numpy()
    err = np.abs(pred - features.target_mag)
    assert np.all(half95 >= sigma)
    calibrated = 0
    for r in range(len(ESTIMATES)):
        rows = regime == r
        if rows.sum() < 50:
            continue
        calibrated += 1
        # The ceil((n + 1) q)-th of n scores: coverage is q to q + 2/n.
        n = rows.sum()
        for half, q in ((sigma, 0.6827), (half95, 0.95)):
            covered = np.mean(err[rows] <= half[rows] * (1 + 1e-6))
            assert q <= covered <= q + 2.0 / n
    assert calibrated >= 1
    assert np.all(scales > 0)
    assert np.all(tails > 0)


def test_a_small_validation_set_still_calibrates_the_intervals(features):
    """Eight validation exposures (one night of a small training run): every
    regime takes their pooled conformal calibration instead of the head's
    uncalibrated sigma, so the 68.3 % interval holds the ceil(9 x 0.683) = 7
    smallest of the 8 scores exactly: 7 of 8 covered, not 0 or 8 (an untrained
    head's sigma is far off, either way)."""
    torch.manual_seed(1)
    model = AZPRC(SMALL).eval()
    val = features.select(np.arange(8))
    scales, _ = calibrate_uncertainty(model, val)
    assert np.all(scales == scales[0])  # one pooled factor for every regime
    assert scales[0] != 1.0
    pred, sigma, _ = predict_intervals(model, val)
    covered = np.abs(pred - val.target_mag) <= sigma * (1 + 1e-6)
    assert covered.sum() == 7


def _covered_as_conformal(err, half, rows, q):
    """The ceil((n + 1) q)-th of n scores: coverage is q to q + 2/n."""
    covered = np.mean(err[rows] <= half[rows] * (1 + 1e-6))
    return q <= covered <= q + 2.0 / rows.sum()


def test_each_domain_gets_its_own_calibration(features):
    """The same exposures as domain 0 and, with 30 mmag more scatter in the
    targets, as domain 2 (an instrument the network predicts worse): each
    domain's intervals hold 68.3 / 95 % of its own errors, domain 2's wider; a
    domain with no validation nights (1) takes the calibration of them all;
    recalibrating one domain from its own labelled nights leaves the others."""
    torch.manual_seed(1)
    model = AZPRC(SMALL).eval()
    noise = np.random.default_rng(3).normal(0.0, 0.03, len(features))
    worse = replace(
        features,
        target_mag=features.target_mag + noise,
        domain=np.full(len(features), 2),
        night=np.char.add("other:", features.night.astype(str)),
    )
    both = FeatureSet.concat([features, worse])
    pooled, _ = calibrate_uncertainty(model, both)
    for fs in (features, worse):
        pred, sigma, half95 = predict_intervals(model, fs)
        err = np.abs(pred - fs.target_mag)
        regime = _parts(model, fs).regime.numpy()
        for r in range(len(ESTIMATES)):
            rows = regime == r
            if rows.sum() >= 50:
                assert _covered_as_conformal(err, sigma, rows, 0.6827)
                assert _covered_as_conformal(err, half95, rows, 0.95)
    scale = model.sigma_scale.numpy()
    assert np.all(scale[2] > scale[0])
    np.testing.assert_allclose(scale[1], pooled)
    before = model.sigma_scale.clone()
    own, _ = calibrate_uncertainty(model, worse.select(np.arange(200)), domain=2)
    torch.testing.assert_close(model.sigma_scale[:2], before[:2])
    np.testing.assert_allclose(model.sigma_scale[2].numpy(), own)
    assert not np.allclose(own, before[2].numpy())
    with pytest.raises(ValueError, match="domain 3"):
        calibrate_uncertainty(model, worse, domain=3)


def test_context_out_of_night_does_not_see_the_night_itself(features):
    """Each night's clear-sky offsets come from models fitted without it: a
    night's own classical zero points, shifted by 50 mmag, move its in-sample
    clear-sky offsets and not its out-of-night ones, which are those of the
    models fitted on the other nights; rows keep their order."""
    night = features.night[0]
    own = features.night == night
    zp = features.catalog_zp_mag
    shifted = replace(features, catalog_zp_mag=np.where(own, zp + 0.05, zp))

    def fit_without(n):
        return fit_clear_sky_models(shifted.select(shifted.night != n))

    out = attach_context_out_of_night(shifted, fit_without)
    plain = attach_context(shifted, fit_clear_sky_models(features.select(~own)))
    np.testing.assert_allclose(out.clear_sky_mag[own], plain.clear_sky_mag[own])
    np.testing.assert_allclose(out.context[own], plain.context[own])
    in_sample = attach_context(shifted, fit_clear_sky_models(shifted))
    assert np.max(np.abs(in_sample.clear_sky_mag[own] - out.clear_sky_mag[own])) > 1e-3
    other = features.night == features.night[~own][0]
    expected = attach_context(shifted, fit_without(features.night[~own][0]))
    np.testing.assert_allclose(out.clear_sky_mag[other], expected.clear_sky_mag[other])
    np.testing.assert_array_equal(out.expid, shifted.expid)
