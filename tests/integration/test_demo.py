"""`photocal demo` for real: on the tiny preset in the default run, and on the
small preset as `make demo` runs it (slow) with the README's demo figures
against the simulator's truth. Simulate, then every stage through the Prefect
flow on a two-worker LocalCluster: index, masters from the raw calibration
frames, reduce + photometry, ubercal, train, score.

tiny's 8 exposures support one ubercal zero point per exposure, which the
stage chooses itself (seed 4; with a zero point per exposure and quadrant, the
suite's seed 3 leaves a quadrant of one exposure that shares no star)."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from statchecks import assert_fails, assert_unit_pulls, z_score
from truthscore import score_pulls, ubercal_pulls

from flows.cli import main
from tasks.io.store import list_groups

pytestmark = pytest.mark.integration


def _demo(work, *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["demo", "--workdir", str(work), *args])
    assert rc == 0, out.getvalue() + err.getvalue()
    # What an operator sees on success: at most 60 lines, both streams.
    lines = (out.getvalue() + err.getvalue()).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    return out.getvalue()


def check_demo_report(text: str, work, preset: str, bands: tuple[str, ...]) -> None:
    store = work / "photocal.zarr"
    assert f"[1/3] simulating the '{preset}' survey" in text
    assert (work / "report" / "index.html").is_file()
    assert "rejected files (5)" in text
    nights = [n for n in list_groups(store, "index") if n != "unknown-night"]
    assert len(nights) == 2
    for night in nights:
        assert f"nights/{night}/catalog" in text
        assert f"ml/scores/{night}:" in text
    for band in bands:
        assert f"ubercal/{band}:" in text
        assert re.search(rf"ubercal/{band} zero points vs the simulator's truth", text)
    assert "zero-point network ->" in text
    assert (work / "models" / "azprc" / "model_card.json").is_file()
    assert re.search(r"demo finished in [\d.]+ s", text)


def check_ubercal_pulls(work, band: str) -> np.ndarray:
    """Two-sided: the pulls' width in the chi-square band of their number,
    centred; errors x4 or /4 fail whatever the number (8 on tiny)."""
    pulls = ubercal_pulls(work / "photocal.zarr", work / "sim" / "truth.zarr", band)
    assert_unit_pulls(pulls, label=f"demo ubercal/{band} pulls")
    for factor in (4.0, 0.25):
        assert_fails(assert_unit_pulls, pulls / factor)
    return pulls


@pytest.fixture(scope="module")
def tiny_demo(prefect_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny-demo")
    return _demo(work, "--preset", "tiny", "--seed", "4"), work


def test_demo_on_tiny_runs_every_stage(tiny_demo):
    text, work = tiny_demo
    check_demo_report(text, work, "tiny", ("r",))
    pulls = check_ubercal_pulls(work, "r")
    assert len(pulls) == 8  # one zero point per exposure


def test_demo_on_tiny_scores_match_the_truth_within_their_uncertainty(tiny_demo):
    """The network's scores against the truth zero points: every exposure
    within 3.3 of its own sigma, and the width two-sided."""
    _, work = tiny_demo
    scores = score_pulls(work / "photocal.zarr", work / "sim" / "truth.zarr")
    assert len(scores) == 8
    assert np.all(np.abs(scores) < z_score()), scores
    assert_unit_pulls(scores, label="demo network score pulls")


@pytest.fixture(scope="module")
def small_demo(prefect_server, tmp_path_factory):
    """`make demo`'s run (~200 s idle)."""
    work = tmp_path_factory.mktemp("small-demo")
    return _demo(work, "--preset", "small", "--seed", "0"), work


@pytest.mark.slow
def test_demo_on_small_matches_the_readme(small_demo):
    """Both bands, 12 exposures x 16 quadrants each against the truth: the
    width in the chi-square band of ~192 values (0.83-1.17; README: pull rms
    1.11 in g, 0.92 in r)."""
    text, work = small_demo
    check_demo_report(text, work, "small", ("g", "r"))
    for band in ("g", "r"):
        assert np.isfinite(check_ubercal_pulls(work, band)).sum() >= 150
