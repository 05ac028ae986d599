"""tasks/io/truth.py's score_ubercal, which makes the demo's "ubercal zero points
vs the simulator's truth" line: given an ubercal group built from the truth with
a known offset, a known scatter and known errors, it must report exactly those."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tasks.io.store import read_group, write_group
from tasks.io.truth import score_ubercal

OFFSET_MAG = 0.0123
SCATTER_MAG = 0.004


def _solution(truth_store, *, offset: float, scatter: float, err: float, seed: int = 0):
    """An ``ubercal/r`` group on the truth's (expid, quadrant) grid: the truth
    zero point plus each quadrant's mean true starflat (the gauge ubercal
    uses), plus ``offset`` and Gaussian noise of ``scatter``, errors ``err``."""
    zp = read_group(truth_store, "zp")
    starflat = read_group(truth_store, "maps/starflat/r").starflat
    level = starflat.mean(("y", "x")).sel(quadrant=zp.quadrant).values
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, scatter, zp.zp.shape)
    values = zp.zp.values + level[None] + offset + noise
    ds = xr.Dataset(
        {
            "zp": (("expid", "quadrant"), values),
            "zp_err": (("expid", "quadrant"), np.full(zp.zp.shape, err)),
        },
        coords={"expid": zp.expid.values, "quadrant": zp.quadrant.values},
    )
    return ds, noise


@pytest.fixture
def store(tmp_path):
    return tmp_path / "photocal.zarr"


def test_score_reports_the_injected_offset_scatter_and_pulls(tiny_survey, store):
    ds, noise = _solution(
        tiny_survey.truth, offset=OFFSET_MAG, scatter=SCATTER_MAG, err=SCATTER_MAG
    )
    write_group(store, "ubercal/r", ds)
    score = score_ubercal(store, tiny_survey.truth, "r")
    # Exact, from the noise drawn: the scorer adds nothing and loses nothing.
    centred = noise - noise.mean()
    assert score["n"] == noise.size == 64
    assert score["offset_mmag"] == pytest.approx(1e3 * (OFFSET_MAG + noise.mean()), abs=1e-9)
    assert score["rms_mmag"] == pytest.approx(
        1e3 * np.sqrt(np.mean((OFFSET_MAG + noise) ** 2)), abs=1e-9
    )
    assert score["rms_centred_mmag"] == pytest.approx(1e3 * np.sqrt(np.mean(centred**2)), abs=1e-9)
    assert score["err_median_mmag"] == pytest.approx(1e3 * SCATTER_MAG)
    assert score["pull_rms"] == pytest.approx(np.sqrt(np.mean((centred / SCATTER_MAG) ** 2)))
    # And so, within the noise of 64 values, the injected numbers.
    assert score["rms_centred_mmag"] == pytest.approx(1e3 * SCATTER_MAG, rel=0.3)


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_score_pull_rms_follows_the_stated_errors(tiny_survey, store, factor):
    """Errors stated x2 (or /2) move the pull rms by 1/2 (or 2), the offset not."""
    base, _ = _solution(tiny_survey.truth, offset=0.0, scatter=SCATTER_MAG, err=SCATTER_MAG)
    write_group(store, "ubercal/r", base)
    ref = score_ubercal(store, tiny_survey.truth, "r")
    write_group(store, "ubercal/r", base.assign(zp_err=factor * base.zp_err))
    scaled = score_ubercal(store, tiny_survey.truth, "r")
    assert scaled["pull_rms"] == pytest.approx(ref["pull_rms"] / factor)
    assert scaled["offset_mmag"] == pytest.approx(ref["offset_mmag"])


def test_score_leaves_out_unconstrained_zero_points(tiny_survey, store):
    ds, _ = _solution(tiny_survey.truth, offset=0.0, scatter=SCATTER_MAG, err=SCATTER_MAG)
    zp = ds.zp.values.copy()
    zp[0, :3] = np.nan
    write_group(store, "ubercal/r", ds.assign(zp=(("expid", "quadrant"), zp)))
    score = score_ubercal(store, tiny_survey.truth, "r")
    assert score["n"] == 61
    assert np.isfinite([score[k] for k in score]).all()


def test_score_uses_the_gauge_of_the_solution(tiny_survey, store):
    """Without each quadrant's mean starflat in the truth the quadrants would
    disagree by up to the starflat's range: the starflat-free solution scores
    as a larger rms, so the scorer does add the level."""
    ds, _ = _solution(tiny_survey.truth, offset=0.0, scatter=0.0, err=SCATTER_MAG)
    starflat = read_group(tiny_survey.truth, "maps/starflat/r").starflat
    level = starflat.mean(("y", "x")).sel(quadrant=ds.quadrant).values
    write_group(store, "ubercal/r", ds.assign(zp=ds.zp - level[None]))
    score = score_ubercal(store, tiny_survey.truth, "r")
    centred = level - level.mean()
    assert score["rms_centred_mmag"] == pytest.approx(1e3 * np.sqrt(np.mean(centred**2)))
    assert score["rms_centred_mmag"] > 1.0
