"""The lightcurves stage through `photocal run` (Prefect flow on a LocalCluster)
on a simulated survey with two transients in their hosts: the groups it writes,
their fields and attrs, and the light curves against the injected truth.

The earlier stages run without Prefect in the fixture (index, masters, reduce +
photometry with the reduced products kept, ubercal with its default, data-sized
model); the slow test runs every stage in one `photocal run`.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from flows.cli import main
from tasks.index import index_sequentially
from tasks.io.store import read_group
from tasks.masters import build_masters_sequentially
from tasks.reduce import ReduceConfig, reduce_night
from tasks.report.data import night_qa
from tasks.report.html import write_report
from tasks.report.sections import Table, night_sections
from tasks.simulate import simulate_survey
from tasks.ubercal import UbercalStageConfig, run_ubercal_stage

pytestmark = pytest.mark.integration

FIELDS = {"expid", "mjd", "band", "flux_njy", "flux_njy_err", "mag", "mag_err", "flags"}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("lc")
    res = simulate_survey(out / "sim", preset="field", seed=7, nights=5, transients=2, jobs=2)
    store = str(out / "store.zarr")
    index_sequentially(str(res.raw), store)
    build_masters_sequentially(store)
    for night in res.nights:
        reduce_night(store, night, str(res.refcat), reduce_config=ReduceConfig(keep_reduced=True))
    run_ubercal_stage(store, str(res.refcat), UbercalStageConfig(band="r"))
    return res, store


@pytest.fixture(scope="module")
def ran(survey):
    res, store = survey
    argv = ["run", "--store", store, "--stages", "lightcurves", "--targets", str(res.targets)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--workers", "2"]) == 0
    return res, store, out.getvalue()


def _truth(res, name):
    ep = read_group(res.truth, "transient_epochs")
    rows = ep.name.values == name
    return dict(zip(ep.expid.values[rows].tolist(), ep.flux_njy.values[rows], strict=True))


def test_groups_have_the_issue_fields_and_attrs(ran):
    _res, store, out = ran
    for name in ("SIM001", "SIM002"):
        assert f"lightcurves/{name}" in out
        for group in ("lightcurves", "lightcurves_forced"):
            lc = read_group(store, f"{group}/{name}")
            assert set(lc.data_vars) == FIELDS
            assert set(lc.dims) == {"epoch"}
            assert lc.expid.dtype == np.int64
            assert lc.flags.dtype == np.int64
            assert lc.flux_njy.dtype == np.float64
            assert np.all(np.diff(lc.mjd.values) >= 0)
            f, m = lc.flux_njy.values, lc.mag.values
            pos = np.isfinite(f) & (f > 0)
            assert np.all(np.isnan(m[~pos]))
            np.testing.assert_allclose(m[pos], -2.5 * np.log10(f[pos]) + 31.4)
            np.testing.assert_allclose(
                lc.mag_err.values[pos], 2.5 / np.log(10) * lc.flux_njy_err.values[pos] / f[pos]
            )
        lc = read_group(store, f"lightcurves/{name}")
        band = lc.attrs["bands"]["r"]
        for key in ("reference_image", "chi2_dof", "flux_scale_correction", "baseline"):
            assert key in band
        assert band["baseline"]["source"] == "targets"
        assert 0.5 < band["chi2_dof"] < 2.0
        assert abs(band["flux_scale_correction"] - 1) < 0.05
        assert lc.attrs["config"]["stamp_half_fwhm"] > 0
        assert lc.attrs["target"]["name"] == name


def test_every_kept_exposure_near_the_target_has_a_row(ran):
    """Nothing is skipped in silence: exposures that put the target in a gap or
    just off the CCD are rows with flag 1 and no flux."""
    res, store, _ = ran
    ep = read_group(res.truth, "transient_epochs")
    for name in ("SIM001", "SIM002"):
        lc = read_group(store, f"lightcurves/{name}")
        rows = ep.name.values == name
        on = ep.expid.values[rows][ep.quadrant.values[rows] >= 0]
        measured = lc.expid.values[(lc.flags.values & 1) == 0]
        assert set(on) == set(measured)
        off = (lc.flags.values & 1) != 0
        assert np.all(np.isnan(lc.flux_njy.values[off]))


def test_light_curves_recover_the_truth(ran):
    """Pooled over both transients: epochs before the explosion consistent with
    zero (chi^2/N <= 2) and the others' pulls of unit width within what 20-30
    pulls allow (and the ubercal zero points' errors, propagated, of ~1 %).
    The classical curve is measured on fewer epochs (its kernel needs stars)."""
    res, store, _ = ran
    for group, min_measured in (("lightcurves", 0.8), ("lightcurves_forced", 0.4)):
        pre, post, n_on, n_ok = [], [], 0, 0
        for name in ("SIM001", "SIM002"):
            lc = read_group(store, f"{group}/{name}")
            truth = _truth(res, name)
            t = np.array([truth[e] for e in lc.expid.values])
            f, e = lc.flux_njy.values, lc.flux_njy_err.values
            on = (lc.flags.values & 1) == 0
            ok = np.isfinite(f) & on
            n_on += int(on.sum())
            n_ok += int(ok.sum())
            pull = (f - t) / e
            pre += list(pull[ok & (t == 0)])
            post += list(pull[ok & (t > 0)])
        assert n_ok >= min_measured * n_on, (group, n_ok, n_on)
        if group == "lightcurves":
            assert len(pre) >= 6
            assert np.mean(np.square(pre)) <= 2.0
            assert 0.6 <= np.std(post) <= 1.5, np.std(post)


def test_the_report_shows_the_stages_light_curves(ran, tmp_path):
    """The QA report of the stage's own groups: the night page's light-curve table
    equal to the groups (epochs in the night, measured epochs, scene-model and
    difference-image peak fluxes), and the pages written."""
    res, store, _ = ran
    night = res.nights[-1]
    files = write_report(store, tmp_path, [night])
    assert files.pages[night].is_file()
    assert files.index.is_file()
    section = next(s for s in night_sections(night_qa(store, night)) if s.id == "lightcurves")
    table = next(b for b in section.blocks if isinstance(b, Table))
    exposures = read_group(store, f"nights/{night}/exposures").expid.values
    assert [r[0] for r in table.rows] == ["SIM001", "SIM002"]
    for row in table.rows:
        lc = read_group(store, f"lightcurves/{row[0]}")
        forced = read_group(store, f"lightcurves_forced/{row[0]}")
        assert row[1:7] == (
            str(lc.sizes["epoch"]),
            str(int(np.isin(lc.expid.values, exposures).sum())),
            str(int(np.isfinite(lc.flux_njy.values).sum())),
            "r",
            f"{np.nanmax(lc.flux_njy.values):.1f}",
            f"{np.nanmax(forced.flux_njy.values):.1f}",
        )


def test_the_stage_needs_its_targets(survey, capsys):
    _, store = survey
    assert main(["run", "--store", store, "--stages", "lightcurves"]) == 2
    assert "--targets" in capsys.readouterr().err


@pytest.mark.slow
def test_every_stage_in_one_command(tmp_path, capsys):
    """`photocal run --stages index,masters,reduce,photometry,ubercal,lightcurves
    --keep-reduced --targets T`: one flow run from raw files to light curves."""
    res = simulate_survey(tmp_path / "sim", preset="field", seed=8, nights=4, transients=1, jobs=2)
    store = str(tmp_path / "store.zarr")
    argv = [
        "run",
        "--store",
        store,
        "--raw",
        str(res.raw),
        "--refcat",
        str(res.refcat),
        "--stages",
        "index,masters,reduce,photometry,ubercal,lightcurves",
        "--keep-reduced",
        "--targets",
        str(res.targets),
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    assert "lightcurves/SIM001" in capsys.readouterr().out
    lc = read_group(store, "lightcurves/SIM001")
    assert set(lc.data_vars) == FIELDS
    on = (lc.flags.values & 1) == 0
    assert np.isfinite(lc.flux_njy.values[on]).mean() >= 0.8
