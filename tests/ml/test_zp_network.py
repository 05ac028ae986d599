"""The zero-point network: invariances, losses, a tiny training run, checkpoints
and the exported model (docs/zp_network.md)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from statchecks import assert_close_in_sigma, assert_fails, z_score

from ml.zp_baselines import LUTBaseline, regression_metrics
from ml.zp_checkpoint import OnnxScorer, export_onnx, load_checkpoint, save_checkpoint
from ml.zp_clearsky import fit_clear_sky_models
from ml.zp_context import attach_context
from ml.zp_features import FeatureSet, split_by_night
from ml.zp_model import AZPRC, AZPRCConfig, reverse_gradient
from ml.zp_train import (
    TrainConfig,
    calibrate_uncertainty,
    discordant_pair_rate,
    predict,
    predict_intervals,
    ranking_surrogate,
    train_zp_network,
)
from sim.zpsim import DOMAINS, simulate_zp_exposures
from tasks.zp import features_from_simulation

SMALL = AZPRCConfig(patch_px=16, cnn_channels=(4, 8), cnn_out=8, gru_hidden=8, catalog_out=8,
                    telemetry_hidden=8, fusion=(16, 8, 8))  # fmt: skip


@pytest.fixture(scope="module")
def features() -> FeatureSet:
    """Ten nights of domain A and six of B, 16 exposures a night, 16-px patches,
    with their clear-sky offsets and night context."""
    exps = simulate_zp_exposures(DOMAINS["A"], n_nights=10, exposures_per_night=16, patch_px=16)
    exps += simulate_zp_exposures(DOMAINS["B"], n_nights=6, exposures_per_night=16, patch_px=16)
    fs = features_from_simulation(exps, patch_px=16, max_stars=24)
    return attach_context(fs, fit_clear_sky_models(fs))


def _inputs(fs: FeatureSet, rows) -> list[torch.Tensor]:
    from ml.zp_train import _tensors

    return _tensors(fs, np.asarray(rows), torch.device("cpu"))


def test_catalog_encoder_ignores_padding_and_star_order(features):
    torch.manual_seed(0)
    model = AZPRC(SMALL).eval()
    encoder = model.catalog_encoder
    rows = np.nonzero(features.n_stars >= 5)[0][:6]
    patch, stars, n, summary, tel, ctx, dom = _inputs(features, rows)
    with torch.no_grad():
        base = encoder(stars, n)
        base_offset, base_lv, _ = model(patch, stars, n, summary, tel, ctx, dom)
        # more padding
        padded = torch.cat([stars, torch.randn(len(rows), 11, stars.shape[2])], dim=1)
        more = encoder(padded, n)
        more_offset, more_lv, _ = model(patch, padded, n, summary, tel, ctx, dom)
        # stars shuffled within each list (padding garbage, not zeros)
        shuffled = stars.clone()
        for b in range(len(rows)):
            k = int(n[b])
            shuffled[b, :k] = stars[b, torch.randperm(k)]
            shuffled[b, k:] = torch.randn(stars.shape[1] - k, stars.shape[2])
        perm = encoder(shuffled, n)
        # the exposure's stars changed: what the encoder says must change
        other = stars.clone()
        other[:, 0, -1] += 5.0  # the star's own zero-point offset
        changed = encoder(other, n)
    torch.testing.assert_close(more, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(more_offset, base_offset, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(more_lv, base_lv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(perm, base, atol=1e-5, rtol=1e-5)
    assert torch.all((changed - base).abs().amax(dim=1) > 1e-4)


def test_empty_star_list_gives_a_finite_answer(features):
    model = AZPRC(SMALL).eval()
    patch, stars, n, summary, tel, ctx, dom = _inputs(features, [0, 1])
    with torch.no_grad():
        none = torch.zeros_like(n)
        offset, log_var, _ = model(patch, stars, none, summary * 0, tel, ctx * 0, dom)
    assert torch.isfinite(offset).all()
    assert torch.isfinite(log_var).all()


def test_gradient_reversal_flips_the_sign():
    x = torch.randn(5, 3, requires_grad=True)
    (reverse_gradient(x, 0.25) * torch.arange(3.0)).sum().backward()
    expected = -0.25 * torch.arange(3.0).expand(5, 3)
    torch.testing.assert_close(x.grad, expected)
    y = torch.randn(4, requires_grad=True)
    out = reverse_gradient(y, 0.25)
    torch.testing.assert_close(out, y)


def test_ranking_surrogate_decreases_as_the_order_improves():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.normal(size=64))
    noise = torch.from_numpy(rng.normal(size=64))
    surrogate, discordant = [], []
    for w in (3.0, 1.0, 0.3, 0.1, 0.0):  # less noise: better order
        pred = target + w * noise
        surrogate.append(float(ranking_surrogate(pred, target, tau=0.1)))
        discordant.append(discordant_pair_rate(pred.numpy(), target.numpy()))
    assert all(a > b for a, b in itertools.pairwise(surrogate))
    assert all(a >= b for a, b in itertools.pairwise(discordant))
    assert discordant[-1] == 0.0
    assert discordant[0] > 0.2
    assert float(ranking_surrogate(-target, target, tau=0.1)) > 0.9


def test_split_never_cuts_a_night(features):
    train, val, test = split_by_night(features.night, seed=3)
    assert not (train & val).any()
    assert not (train & test).any()
    assert not (val & test).any()
    assert (train | val | test).all()
    for mask in (train, val, test):
        inside, outside = set(features.night[mask]), set(features.night[~mask])
        assert inside
        assert not inside & outside


TRAIN = TrainConfig(epochs=12, batch_size=32, patience=12, device="cpu", seed=0)


@pytest.fixture(scope="module")
def trained(features):
    """The tiny training run, its night split, and the same network untrained
    (same seed, same initial weights; its uncertainty calibrated alike)."""
    split = split_by_night(features.night, seed=0)
    train, val, _ = (features.select(m) for m in split)
    result = train_zp_network(SMALL, train, val, TRAIN)
    torch.manual_seed(TRAIN.seed)
    untrained = AZPRC(SMALL).eval()
    calibrate_uncertainty(untrained, val)
    return result, split, untrained


def _paired_gain(theirs: np.ndarray, ours: np.ndarray) -> float:
    """How many standard errors our squared errors are below theirs, exposure
    by exposure (a paired comparison: the exposures' own difficulty cancels)."""
    ok = np.isfinite(theirs) & np.isfinite(ours)
    d = theirs[ok] ** 2 - ours[ok] ** 2
    se = np.std(d, ddof=1) / np.sqrt(ok.sum())
    return float(np.mean(d) / se) if se > 0 else 0.0


def _sign_gain(theirs: np.ndarray, ours: np.ndarray) -> float:
    """How many binomial standard errors the share of exposures where our
    error is the smaller one lies above one half (a sign test on the paired
    absolute errors: one large error counts once, not squared)."""
    ok = np.isfinite(theirs) & np.isfinite(ours) & (np.abs(theirs) != np.abs(ours))
    closer = np.mean(np.abs(ours[ok]) < np.abs(theirs[ok]))
    return float((closer - 0.5) / np.sqrt(0.25 / ok.sum()))


def check_network_beats_its_baselines(pred, held_out, untrained_pred, lut_pred) -> None:
    """On held-out nights, exposure by exposure: the trained network is better
    than the same network untrained (one-sided, z > 2.33, alpha 0.01: the
    combination of the classical and context estimates makes the untrained
    model a fair start, 20 against 9.7 mmag here, 2.8 sigma) and than the LUT
    (z > 3.29), and not worse than the classical zero point of the same stars
    (z > -2.33), both in mean squared error and by the sign test: on these 48
    exposures one clouded exposure 60 mmag off dominates the variance of the
    squared-error differences, so that test alone cannot see 7.5 mmag of noise
    added to every exposure (z -1.4 to -1.8 over five noise draws); the sign
    test can (z -3.5 to -4.0; at 5 mmag it is -2.3 to -3.2, too close to the
    bound for a negative test)."""
    truth = held_out.target_mag
    err = pred - truth
    classical = held_out.catalog_zp_mag - truth
    gains = {
        "untrained": _paired_gain(untrained_pred - truth, err),
        "LUT": _paired_gain(lut_pred - truth, err),
        "classical": _paired_gain(classical, err),
        "classical, sign test": _sign_gain(classical, err),
    }
    assert gains["untrained"] > z_score(0.02), gains
    assert gains["LUT"] > z_score(), gains
    assert gains["classical"] > -z_score(0.02), gains
    assert gains["classical, sign test"] > -z_score(0.02), gains


def _held_out(features, trained):
    _, (train, _, test), untrained = trained
    held_out = features.select(test)
    lut = LUTBaseline().fit(features.select(train))
    return held_out, predict(untrained, held_out)[0], lut.predict(held_out)[0]


def test_tiny_training_run_lowers_validation_loss_and_beats_its_baselines(features, trained):
    result, (train, val, _), _ = trained
    losses = [h["val_mse"] for h in result.history]
    assert result.history[0]["epoch"] == -1
    # The catalog skip makes the untrained model a fair start: training must
    # still take a fifth off its validation error.
    assert min(losses[1:]) < 0.8 * losses[0], losses
    held_out, untrained_pred, lut_pred = _held_out(features, trained)
    pred = predict(result.model, held_out)[0]
    check_network_beats_its_baselines(pred, held_out, untrained_pred, lut_pred)
    # Same seed, same data, same device: the same model.
    again = train_zp_network(SMALL, features.select(train), features.select(val), TRAIN)
    np.testing.assert_array_equal(predict(again.model, held_out)[0], pred)


@pytest.mark.parametrize("perturbation", ["untrained", "7.5 mmag noise", "catalog zp + 5 mmag"])
def test_baseline_check_fails_for_a_network_that_learnt_nothing(features, trained, perturbation):
    held_out, untrained_pred, lut_pred = _held_out(features, trained)
    pred = predict(trained[0].model, held_out)[0]
    rng = np.random.default_rng(1)
    pred = {
        "untrained": untrained_pred,
        "7.5 mmag noise": pred + rng.normal(0, 0.0075, len(pred)),
        "catalog zp + 5 mmag": np.nan_to_num(held_out.catalog_zp_mag) + 0.005,
    }[perturbation]
    assert_fails(check_network_beats_its_baselines, pred, held_out, untrained_pred, lut_pred)


def _mad_width_band(n: int, alpha: float = 1e-3) -> tuple[float, float]:
    """Range of ``median(|pull|) / 0.6745`` for ``n`` unit Gaussian pulls, from
    20,000 simulated sets (the robust width has no closed-form band)."""
    draws = np.random.default_rng(0).normal(size=(20_000, n))
    widths = np.median(np.abs(draws), axis=1) / 0.6745
    lo, hi = np.quantile(widths, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def check_intervals_are_calibrated(pred, sigma, half95, truth) -> None:
    """The network's intervals (its uncertainty head, rescaled per regime on
    the validation nights by calibrate_uncertainty) hold 68.3 % and 95 % of
    held-out errors within the binomial error of n exposures, and the core of
    the pulls has unit width: ``median(|pull|) / 0.6745`` within its band for
    n unit Gaussians. The robust width, because the errors have heavier tails
    than a Gaussian by design (the 95 % interval carries its own tail factor):
    here one clouded exposure is 7.7 sigma off, and the standard deviation of
    48 pulls follows it. Two-sided: intervals that are too wide fail as surely
    as too narrow ones."""
    m = regression_metrics(pred, sigma, truth, half95=half95)
    n = int(np.isfinite(pred - truth).sum())
    for key, p in (("coverage68", 0.6827), ("coverage95", 0.95)):
        assert_close_in_sigma(m[key], p, np.sqrt(p * (1 - p) / n), label=key)
    pulls = (pred - truth) / sigma
    width = float(np.median(np.abs(pulls[np.isfinite(pulls)])) / 0.6745)
    lo, hi = _mad_width_band(n)
    assert lo < width < hi, f"robust pull width {width:.3f} outside [{lo:.3f}, {hi:.3f}] (n={n})"


def test_network_intervals_are_calibrated_on_held_out_nights(features, trained):
    held_out, _, _ = _held_out(features, trained)
    intervals = predict_intervals(trained[0].model, held_out)
    check_intervals_are_calibrated(*intervals, held_out.target_mag)


@pytest.mark.parametrize("factor", [2.0, 0.5], ids=["sigma x2", "sigma / 2"])
def test_interval_check_fails_on_miscalibrated_sigma(features, trained, factor):
    held_out, _, _ = _held_out(features, trained)
    pred, sigma, half95 = predict_intervals(trained[0].model, held_out)
    assert_fails(
        check_intervals_are_calibrated, pred, factor * sigma, factor * half95, held_out.target_mag
    )


def test_checkpoint_round_trip_and_onnx_parity(features, tmp_path):
    torch.manual_seed(2)
    model = AZPRC(SMALL).eval()
    with torch.no_grad():
        model.sigma_scale.copy_(torch.tensor([[1.7], [2.3], [0.9]]).expand(3, 4))
        model.tail_scale.copy_(torch.tensor([1.1, 1.2, 1.3, 1.4]))
    # Exposures of every domain: each takes its domain's calibration, in the export too.
    features = replace(features, domain=np.arange(len(features)) % 3)
    card = {"metrics": {"rmse": 0.01}, "data_sha256": "x"}
    save_checkpoint(tmp_path / "ckpt", model, card)
    loaded, loaded_card = load_checkpoint(tmp_path / "ckpt")
    assert loaded_card["metrics"] == card["metrics"]
    assert AZPRCConfig.from_dict(loaded_card["model_config"]) == SMALL
    eager = predict(model, features)
    one_domain = predict(model, replace(features, domain=np.zeros(len(features), dtype=np.int64)))
    np.testing.assert_array_equal(one_domain[0], eager[0])  # the domain sets sigma only
    ratio = np.array([1.7, 2.3, 0.9])[features.domain] / 1.7
    np.testing.assert_allclose(eager[1] / one_domain[1], ratio, rtol=1e-5)
    np.testing.assert_array_equal(predict(loaded, features)[0], eager[0])
    np.testing.assert_array_equal(predict(loaded, features)[1], eager[1])
    onnx_path = export_onnx(loaded, features.select(np.arange(4)), tmp_path / "model.onnx")
    exported = OnnxScorer(onnx_path).predict(features)  # more rows and another batch size
    np.testing.assert_allclose(exported[0], eager[0], atol=2e-6)
    np.testing.assert_allclose(exported[1], eager[1], rtol=2e-5)
    # The 95 % half-widths (per-regime tail factors) travel in the export too.
    half95 = OnnxScorer(onnx_path).intervals(features)[2]
    np.testing.assert_allclose(half95, predict_intervals(model, features)[2], rtol=2e-5)


def test_checkpoint_with_one_calibration_for_all_domains_loads(features, tmp_path):
    """A checkpoint from before the per-domain calibration holds one row of
    factors: every domain gets it."""
    model = AZPRC(SMALL).eval()
    save_checkpoint(tmp_path / "old", model, {})
    state = load_file(str(tmp_path / "old" / "model.safetensors"))
    state["sigma_scale"] = torch.tensor([1.5, 1.6, 1.7, 1.8])
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    loaded, _ = load_checkpoint(tmp_path / "old")
    assert loaded.sigma_scale.shape == (SMALL.n_domains, 4)
    torch.testing.assert_close(loaded.sigma_scale, state["sigma_scale"].expand(3, 4))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a zero-point checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_predictions_agree(features):
    model = AZPRC(SMALL).eval()
    cpu = predict(model, features, device="cpu")[0]
    gpu = predict(model.to("cuda"), features, device="cuda")[0]
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
