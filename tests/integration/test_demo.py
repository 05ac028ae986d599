"""`photocal demo` for real (slow): the small preset, seed 0, as `make demo`
runs it -- simulate, then every stage through the Prefect flow on a two-worker
LocalCluster -- and the README's demo figures against the simulator's truth.

The tiny preset is no size for the demo's ubercal: its 8 exposures leave the
default fit (a zero point per exposure and quadrant, per-exposure gradients,
10x10 starflat cells) singular on every seed tried (seed 3, the suite's, also
has a quadrant of an exposure that shares no star: DisconnectedGraphError).
The demo takes no ubercal settings, so `photocal demo --preset tiny` stops at
ubercal; the strict xfail below says so and fails once it runs through. The
end-to-end pixel test of the default run is in test_cli_run.py (tiny, one zero
point per exposure, 2x2 starflat cells)."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from statchecks import assert_fails, assert_unit_pulls
from truthscore import ubercal_pulls

from calib.ubercal import UbercalError
from flows.cli import main
from tasks.io.store import list_groups

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(work, *args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["demo", "--workdir", str(work), *args])
    assert rc == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def demo(prefect_server, tmp_path_factory):
    """The demo's printed report and its work directory (~200 s idle)."""
    work = tmp_path_factory.mktemp("demo")
    return _demo(work, "--preset", "small", "--seed", "0"), work


def test_demo_runs_every_stage_and_reports_them(demo):
    text, work = demo
    store = work / "photocal.zarr"
    assert "[1/2] simulating the 'small' survey" in text
    assert "rejected files (5)" in text
    nights = [n for n in list_groups(store, "index") if n != "unknown-night"]
    assert len(nights) == 2
    for night in nights:
        assert f"nights/{night}/catalog" in text
        assert f"ml/scores/{night}:" in text
    for band in ("g", "r"):
        assert f"ubercal/{band}:" in text
    assert "zero-point network ->" in text
    assert (work / "models" / "azprc" / "model_card.json").is_file()
    assert re.search(r"demo finished in [\d.]+ s", text)


@pytest.mark.parametrize("band", ["g", "r"])
def test_demo_ubercal_zero_points_match_the_truth(demo, band):
    """raw -> masters -> photometry -> ubercal on the small preset: 12 exposures
    x 16 quadrants per band against the truth, two-sided (the chi-square band of
    192 values: 0.83-1.17; README: pull rms 1.11 in g, 0.92 in r); errors x2 or
    /2 fail."""
    text, work = demo
    pulls = ubercal_pulls(work / "photocal.zarr", work / "sim" / "truth.zarr", band)
    assert np.isfinite(pulls).sum() >= 150
    assert_unit_pulls(pulls, label=f"demo ubercal/{band} pulls")
    for factor in (2.0, 0.5):
        assert_fails(assert_unit_pulls, pulls / factor)
    # The demo's own line reports them.
    line = re.search(rf"ubercal/{band} zero points vs .* pull rms ([\d.]+)", text)
    assert line is not None


@pytest.mark.xfail(raises=UbercalError, strict=True, reason="the demo takes no ubercal settings")
def test_demo_on_tiny_runs_through(prefect_server, tmp_path):
    _demo(tmp_path, "--preset", "tiny", "--seed", "4")
