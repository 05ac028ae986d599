"""`photocal run` end to end, as an operator types it: every stage on tiny, then a
resumed run that keeps what is complete, ubercal on the night catalogs against
the simulator's truth (the end-to-end pixel test), then the zero-point network
trained and scored on the same store, its scores against the truth."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from statchecks import assert_fails, assert_unit_pulls, std_band, z_score
from truthscore import score_pulls, ubercal_pulls

from flows.cli import main
from tasks.io.store import list_groups, read_group
from tasks.progress import listening
from tasks.ubercal import UbercalStageConfig, run_ubercal_stage

pytestmark = pytest.mark.integration


def _photocal(*argv: str, events: list | None = None, remote: bool = False) -> tuple[str, str]:
    """Run the command line in this process: (stdout, stderr), with the progress
    events it emitted appended to ``events``."""
    out, err = io.StringIO(), io.StringIO()
    sink = [] if events is None else events
    with (
        listening(sink.append, remote=remote),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        assert main(list(argv)) == 0, out.getvalue() + err.getvalue()
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def photometered(prefect_server, tiny_survey, tmp_path_factory):
    """The default stages (index to photometry) on tiny, then the same command
    with --no-overwrite: (store, first (stdout, stderr), second stdout, the first
    run's progress events)."""
    store = tmp_path_factory.mktemp("run") / "photocal.zarr"
    argv = ["run", "--store", str(store), "--raw", str(tiny_survey.raw)]
    argv += ["--refcat", str(tiny_survey.refcat), "--workers", "2"]
    events: list = []
    first = _photocal(*argv, events=events)
    return store, first, _photocal(*argv, "--no-overwrite")[0], events


def test_photocal_run_all_stages_then_resume(photometered, tiny_survey):
    store, (out, err), again, events = photometered
    # The console carries the summary only: no per-task lines, no warnings.
    assert "Task run" not in out + err
    assert "Warning" not in err, err
    assert len((out + err).splitlines()) < 25
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
    assert "kept (already complete)" in again
    assert "nights/2026-03-10/catalog" in again.split("kept (already complete):")[1]


def test_photocal_run_refuses_photometry_without_refcat(tmp_path, capsys):
    assert main(["run", "--store", str(tmp_path / "s.zarr"), "--raw", str(tmp_path)]) == 2
    assert "--refcat" in capsys.readouterr().err


def test_ubercal_zero_points_from_pixels_match_the_truth(photometered, tiny_survey, tmp_path):
    """The one end-to-end pixel test: raw FITS -> index -> masters from the raw
    calibration frames -> reduce + photometry (photocal run) -> ubercal -> zero
    points against the simulator's truth. tiny's 8 exposures of 8 quadrants
    support one zero point per exposure (with a zero point per exposure and
    quadrant one quadrant of one exposure shares no star with the rest:
    DisconnectedGraphError): the stage sizes its model to the data and says so.
    Two-sided: the 8 exposures' pulls have unit width within their chi-square
    band (0.26-1.93) and are centred; errors x4 or /4 fail (what 8 values can
    tell apart). On a copy of the store, so that the network below trains as it
    always has."""
    store = tmp_path / "photocal.zarr"
    shutil.copytree(photometered[0], store)
    out = run_ubercal_stage(store, tiny_survey.refcat, UbercalStageConfig(band="r", plots=False))
    assert "zero points per exposure" in out["model"]
    pulls = ubercal_pulls(store, tiny_survey.truth, "r")
    assert len(pulls) == 8
    assert_unit_pulls(pulls, label="ubercal zero points from pixels")
    for factor in (4.0, 0.25):
        assert_fails(assert_unit_pulls, pulls / factor)


@pytest.fixture(scope="module")
def scored(photometered, tiny_survey, tmp_path_factory):
    """`--stages train,score` on the photometered store (no ubercal targets:
    the network trains on 3 simulated nights of each domain)."""
    store = photometered[0]
    work = tmp_path_factory.mktemp("zp")
    config = work / "zp.json"
    config.write_text(
        '{"sim_nights": 3, "sim_exposures_per_night": 8, "epochs": 3, "patch_px": 16, '
        '"cnn_channels": [4, 8]}'
    )
    checkpoint = work / "models" / "azprc"
    common = ["--store", str(store), "--refcat", str(tiny_survey.refcat), "--workers", "2"]
    events: list = []
    out, err = _photocal(
        "run", *common, "--stages", "train,score", "--zp-config", str(config),
        "--checkpoint", str(checkpoint), events=events, remote=True,
    )  # fmt: skip
    return store, checkpoint, out, err, events


def test_train_and_score_write_a_checkpoint_and_scores(scored, tiny_survey):
    """Features per night, a checkpoint with its card and exported model, and
    scores against the simulator's truth (not against the network's own input,
    the classical zero point): every exposure within 3.3 of its own sigma."""
    store, checkpoint, out, err, events = scored
    # Training runs on a Dask worker: its epochs reach this process.
    epochs = [e.done for e in events if e.stage == "train"]
    assert epochs[:3] == [1, 2, 3]
    assert "Warning" not in err, err
    assert f"zero-point network -> {checkpoint}" in out
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert {"data_sha256", "code_revision", "metrics_test_mag", "model_config"} <= set(card)
    assert card["onnx_max_abs_diff_mag"] < 1e-5
    for night in tiny_survey.nights:
        scores = read_group(store, f"ml/scores/{night}")
        features = read_group(store, f"ml/features/{night}")
        np.testing.assert_array_equal(scores.expid.values, features.expid.values)
        assert np.all(scores.zp_offset_err.values > 0)
        assert scores.attrs["stars_consistency"]["dof"] == len(scores.expid)
    pulls = score_pulls(store, tiny_survey.truth)
    assert len(pulls) == 8
    assert np.all(np.abs(pulls) < z_score()), pulls


def test_network_scores_have_unit_pulls_against_the_truth(scored, tiny_survey):
    """Two-sided: the width of 8 pulls in its chi-square band (0.29-1.86),
    centred within 3.3 / sqrt(8); sigma wider or narrower by more than the
    band's own span (x7) would fail. The intervals come calibrated on simulated
    validation nights; on this survey's second night the network disagrees with
    the stars (chi2 34 over 4 exposures) and score-zp widens them 3.2x."""
    store = scored[0]
    pulls = score_pulls(store, tiny_survey.truth)
    assert_unit_pulls(pulls, label="network score pulls")
    lo, hi = std_band(len(pulls))
    span = 1.1 * hi / lo  # what eight exposures can tell apart, whatever their width
    for factor in (span, 1 / span):
        assert_fails(assert_unit_pulls, pulls / factor)
