"""How AZP-RC makes its answer (docs/zp_network.md): a precision-weighted mean
of the stars' estimate and the night-context estimate, and intervals
calibrated per regime on validation nights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.zp_clearsky import fit_clear_sky_models
from ml.zp_context import attach_context
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
