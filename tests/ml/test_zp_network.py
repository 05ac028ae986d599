"""The zero-point network: invariances, losses, a tiny training run, checkpoints
and the exported model (docs/zp_network.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ml.zp_baselines import LUTBaseline, regression_metrics
from ml.zp_checkpoint import OnnxScorer, export_onnx, load_checkpoint, save_checkpoint
from ml.zp_features import FeatureSet, split_by_night
from ml.zp_model import AZPRC, AZPRCConfig, reverse_gradient
from ml.zp_train import (
    TrainConfig,
    discordant_pair_rate,
    predict,
    ranking_surrogate,
    train_zp_network,
)
from sim.zpsim import DOMAINS, simulate_zp_exposures
from tasks.zp import features_from_simulation

SMALL = AZPRCConfig(patch_px=16, cnn_channels=(4, 8), cnn_out=8, gru_hidden=8, catalog_out=8,
                    telemetry_hidden=8, fusion=(16, 8, 8))  # fmt: skip


@pytest.fixture(scope="module")
def features() -> FeatureSet:
    """Ten nights of domain A and six of B, 16 exposures a night, 16-px patches."""
    exps = simulate_zp_exposures(DOMAINS["A"], n_nights=10, exposures_per_night=16, patch_px=16)
    exps += simulate_zp_exposures(DOMAINS["B"], n_nights=6, exposures_per_night=16, patch_px=16)
    return features_from_simulation(exps, patch_px=16, max_stars=24)


def _inputs(fs: FeatureSet, rows) -> list[torch.Tensor]:
    from ml.zp_train import _tensors

    return _tensors(fs, np.asarray(rows), torch.device("cpu"))


def test_catalog_encoder_ignores_padding_and_star_order(features):
    torch.manual_seed(0)
    model = AZPRC(SMALL).eval()
    rows = np.nonzero(features.n_stars >= 5)[0][:6]
    patch, stars, n, summary, tel = _inputs(features, rows)
    with torch.no_grad():
        base, base_lv, _ = model(patch, stars, n, summary, tel)
        # more padding
        padded = torch.cat([stars, torch.randn(len(rows), 11, 5)], dim=1)
        more, more_lv, _ = model(patch, padded, n, summary, tel)
        # stars shuffled within each list (padding garbage, not zeros)
        shuffled = stars.clone()
        for b in range(len(rows)):
            k = int(n[b])
            shuffled[b, :k] = stars[b, torch.randperm(k)]
            shuffled[b, k:] = torch.randn(stars.shape[1] - k, 5)
        perm, _, _ = model(patch, shuffled, n, summary, tel)
        # the exposure's stars changed: the answer must change
        other = stars.clone()
        other[:, 0, 4] += 5.0
        changed, _, _ = model(patch, other, n, summary, tel)
    torch.testing.assert_close(more, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(more_lv, base_lv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(perm, base, atol=1e-5, rtol=1e-5)
    assert torch.all((changed - base).abs() > 1e-6)


def test_empty_star_list_gives_a_finite_answer(features):
    model = AZPRC(SMALL).eval()
    patch, stars, n, summary, tel = _inputs(features, [0, 1])
    with torch.no_grad():
        offset, log_var, _ = model(patch, stars, torch.zeros_like(n), summary * 0, tel)
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


def test_tiny_training_run_lowers_validation_loss_and_beats_the_lut(features):
    train, val, test = split_by_night(features.night, seed=0)
    config = TrainConfig(epochs=12, batch_size=32, patience=12, device="cpu", seed=0)
    trained = train_zp_network(SMALL, features.select(train), features.select(val), config)
    losses = [h["val_mse"] for h in trained.history]
    assert trained.history[0]["epoch"] == -1
    # The catalog skip makes the untrained model a fair start: training must
    # still take a fifth off its validation error.
    assert min(losses[1:]) < 0.8 * losses[0], losses
    held_out = features.select(test)
    ours = regression_metrics(*predict(trained.model, held_out), held_out.target_mag)
    lut = LUTBaseline().fit(features.select(train))
    theirs = regression_metrics(*lut.predict(held_out), held_out.target_mag)
    assert ours["rmse"] < theirs["rmse"], (ours, theirs)
    # Same seed, same data, same device: the same model.
    again = train_zp_network(SMALL, features.select(train), features.select(val), config)
    np.testing.assert_array_equal(
        predict(again.model, held_out)[0], predict(trained.model, held_out)[0]
    )


def test_checkpoint_round_trip_and_onnx_parity(features, tmp_path):
    torch.manual_seed(2)
    model = AZPRC(SMALL).eval()
    with torch.no_grad():
        model.sigma_scale.fill_(1.7)
    card = {"metrics": {"rmse": 0.01}, "data_sha256": "x"}
    save_checkpoint(tmp_path / "ckpt", model, card)
    loaded, loaded_card = load_checkpoint(tmp_path / "ckpt")
    assert loaded_card["metrics"] == card["metrics"]
    assert AZPRCConfig.from_dict(loaded_card["model_config"]) == SMALL
    eager = predict(model, features)
    np.testing.assert_array_equal(predict(loaded, features)[0], eager[0])
    np.testing.assert_array_equal(predict(loaded, features)[1], eager[1])
    onnx_path = export_onnx(loaded, features.select(np.arange(4)), tmp_path / "model.onnx")
    exported = OnnxScorer(onnx_path).predict(features)  # more rows and another batch size
    np.testing.assert_allclose(exported[0], eager[0], atol=2e-6)
    np.testing.assert_allclose(exported[1], eager[1], rtol=2e-5)


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
