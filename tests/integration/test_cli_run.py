"""`photocal run` end to end, as an operator types it: every stage on tiny, then a
resumed run that keeps what is complete, then the zero-point network trained and
scored on the same store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from tasks.io.store import list_groups, read_group
from tasks.progress import listening

pytestmark = pytest.mark.integration


def test_photocal_run_all_stages_then_resume(tiny_survey, tmp_path, capfd):
    store = tmp_path / "photocal.zarr"
    argv = [
        "run",
        "--store",
        str(store),
        "--raw",
        str(tiny_survey.raw),
        "--refcat",
        str(tiny_survey.refcat),
        "--workers",
        "2",
    ]
    events = []
    with listening(events.append):
        assert main(argv) == 0
    captured = capfd.readouterr()
    out = captured.out
    # The console carries the summary only: no per-task lines, no warnings
    # (worker processes included: capfd reads the file descriptors).
    assert "Task run" not in out + captured.err
    assert "Warning" not in captured.err, captured.err
    assert len((out + captured.err).splitlines()) < 25
    assert "rejected files (5)" in out
    assert "masters/bias/2026-03-05" in out
    nights = [n for n in list_groups(store, "index") if n != "unknown-night"]
    assert nights == list(tiny_survey.nights)
    for night in nights:
        cat = read_group(store, f"nights/{night}/catalog")
        assert {
            "expid",
            "quadrant",
            "source_id",
            "x",
            "y",
            "flux",
            "flux_err",
            "mag_inst",
            "mag_inst_err",
            "flags",
        } <= set(cat.data_vars) | set(cat.coords)
        assert cat.sizes["obs"] > 100
        assert f"nights/{night}/catalog" in out
    # Progress came for every stage run: index chunks, each master, each night.
    finished = {(e.stage, e.label) for e in events if e.done == e.total}
    assert ("masters", "masters/bias/2026-03-05") in finished
    assert {("photometry", n) for n in nights} <= finished
    assert any(stage == "index" for stage, _ in finished)
    assert main([*argv, "--no-overwrite"]) == 0
    again = capfd.readouterr().out
    assert "kept (already complete)" in again
    assert "nights/2026-03-10/catalog" in again.split("kept (already complete):")[1]
    _train_and_score(tiny_survey, store, tmp_path, capfd)


def test_photocal_run_refuses_photometry_without_refcat(tmp_path, capsys):
    assert main(["run", "--store", str(tmp_path / "s.zarr"), "--raw", str(tmp_path)]) == 2
    assert "--refcat" in capsys.readouterr().err


def _train_and_score(tiny_survey, store, tmp_path, capsys):
    """`--stages train,score` on the photometered store: features per night, a
    checkpoint with its card and exported model, and scores whose zero points
    agree with the classical zero point of the same stars within their errors."""
    common = ["--store", str(store), "--refcat", str(tiny_survey.refcat), "--workers", "2"]
    config = tmp_path / "zp.json"
    config.write_text(
        '{"sim_nights": 3, "sim_exposures_per_night": 8, "epochs": 3, "patch_px": 16, '
        '"cnn_channels": [4, 8]}'
    )
    checkpoint = tmp_path / "models" / "azprc"
    argv = ["run", *common, "--stages", "train,score", "--zp-config", str(config)]
    events = []
    with listening(events.append, remote=True):
        assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # Training runs on a Dask worker: its epochs reach this process.
    epochs = [e.done for e in events if e.stage == "train"]
    assert epochs[:3] == [1, 2, 3]
    assert "Warning" not in captured.err, captured.err
    assert f"zero-point network -> {checkpoint}" in out
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert {"data_sha256", "code_revision", "metrics_test_mag", "model_config"} <= set(card)
    assert card["onnx_max_abs_diff_mag"] < 1e-5
    for night in tiny_survey.nights:
        scores = read_group(store, f"ml/scores/{night}")
        features = read_group(store, f"ml/features/{night}")
        np.testing.assert_array_equal(scores.expid.values, features.expid.values)
        assert np.all(scores.zp_offset_err.values > 0)
        nominal = np.array([{"g": 24.8, "r": 24.6, "i": 24.2}[b] for b in scores.band.values])
        classical = nominal + scores.catalog_zp_offset.values
        ok = np.isfinite(classical)
        assert ok.any()
        pull = (scores.zp.values[ok] - classical[ok]) / scores.zp_offset_err.values[ok]
        assert np.all(np.abs(pull) < 3.0), pull
