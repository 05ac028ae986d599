"""The masters stage through the Prefect flow on a real Dask LocalCluster, scored
against the simulator's truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr
from statchecks import assert_close_in_sigma, assert_fails

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from sim.config import make_config
from tasks.io.raw import read_quadrants
from tasks.io.store import list_groups, read_group
from tasks.masters import MastersConfig
from tasks.simulate import simulate_survey

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Tiny, but with enough calibration frames to measure noise floors, and a
    2 ADU bias jump from the second night on."""
    cfg = make_config("tiny", seed=17)
    cfg = cfg.replace(
        schedule=dataclasses.replace(cfg.schedule, n_bias=8, n_flat_per_led=3, n_science=1),
        instrument=dataclasses.replace(cfg.instrument, bias_jump_adu=2.0, bias_jump_night=1),
    )
    return simulate_survey(tmp_path_factory.mktemp("masters"), cfg)


def _run(store, raw, masters):
    with prefect_api():
        return photocal_run.with_options(task_runner=make_task_runner(workers=2))(
            store=str(store), raw=str(raw), stages=["index", "masters"], masters=masters
        )


def _truth(survey, group):
    return xr.open_zarr(survey.truth, group=group, consolidated=False).load()


@pytest.fixture(scope="module")
def one_period(prefect_server, survey, tmp_path_factory):
    """Both nights in one 20-day period."""
    store = tmp_path_factory.mktemp("store") / "photocal.zarr"
    summary = _run(store, survey.raw, MastersConfig())
    return store, summary


def check_master_bias(master: xr.Dataset, survey) -> None:
    """Master bias against the truth (the mean of both nights' bias structure:
    the master combines 8 frames of each, so the 2 ADU jump averages alike)."""
    camera = _truth(survey, "camera")
    nights = sorted(set(_truth(survey, "exposures").night.values.tolist()))
    truth = np.mean([_truth(survey, f"maps/bias/{n}").bias.values for n in nights], axis=0)
    defects = _truth(survey, "maps/defects").defects.values
    n = int(master.nframes.max())
    assert n == 16
    # Each frame's level is the median of its overscan, whose pixels are integer
    # ADU: the median is the nearest integer to the level (its noise, 1.25 x
    # 1.3 ADU / sqrt(1024 pixels) = 0.05, is far below the step), an error
    # uniform in +-0.5 ADU, 1/sqrt(12) = 0.29 ADU per frame, 0.072 ADU after 16
    # frames; the pixels add floor / sqrt(n_pixels) = 0.003 ADU.
    means, sigmas = [], []
    for i, q in enumerate(master.quadrant.values):
        good = defects[i] == 0
        resid = (master.bias.values[i] - truth[i])[good]
        rn_adu = float(camera.read_noise_e.sel(quadrant=q) / camera.gain.sel(quadrant=q))
        floor = rn_adu / np.sqrt(n)
        # What is left per pixel must be read noise averaged down, nothing more.
        assert np.std(resid) == pytest.approx(floor, rel=0.10), (q, np.std(resid), floor)
        sigma = np.sqrt(1 / 12 / n + floor**2 / good.sum())
        assert_close_in_sigma(float(np.mean(resid)), 0.0, sigma, label=f"quadrant {q} mean")
        means.append(float(np.mean(resid)))
        sigmas.append(sigma)
    # Quadrants have independent levels: their mean is known to 0.026 ADU.
    sigma_all = float(np.sqrt(np.sum(np.square(sigmas)))) / len(sigmas)
    assert_close_in_sigma(float(np.mean(means)), 0.0, sigma_all, label="mean over quadrants")


@pytest.fixture(scope="module")
def bias_master(one_period):
    store, _ = one_period
    (period,) = list_groups(store, "masters/bias")
    return read_group(store, f"masters/bias/{period}").load()


def test_master_bias_reaches_the_read_noise_floor(survey, bias_master):
    check_master_bias(bias_master, survey)
    assert bias_master.attrs["summary"]["is_reference"]


@pytest.mark.parametrize(
    "perturb",
    [
        lambda m: m.assign(bias=m.bias + 1.0),
        lambda m: m.assign(bias=m.bias - 0.3),
        lambda m: m.assign(bias=m.bias + 0.3 * (m.quadrant == m.quadrant[0])),
        lambda m: m.assign(bias=m.bias + np.random.default_rng(0).normal(0, 0.35, m.bias.shape)),
    ],
    ids=["+1 ADU", "-0.3 ADU", "one quadrant +0.3 ADU", "one floor of extra noise"],
)
def test_master_bias_check_fails_on_an_offset(survey, bias_master, perturb):
    assert_fails(check_master_bias, perturb(bias_master), survey)


def test_master_flat_reaches_its_photon_noise_floor(survey, one_period):
    store, _ = one_period
    (period,) = list_groups(store, "masters/flat/r")
    master = read_group(store, f"masters/flat/r/{period}")
    truth = _truth(survey, "maps/flat/r").flat.values
    defects = _truth(survey, "maps/defects").defects.values
    ex = _truth(survey, "exposures")
    flats = [p for p, t in zip(ex.path.values, ex.imagetyp.values, strict=True) if t == "FLAT"]
    for i, q in enumerate(master.quadrant.values):
        good = (defects[i] == 0) & (master.defects.values[i] == 0)
        # Photon-noise floor per pixel: 1 / sqrt(total electrons collected).
        total_e = 0.0
        for path in flats:
            fr = read_quadrants(survey.raw / str(path), quadrants=[int(q)])[0]
            total_e = total_e + (fr.data - np.median(fr.overscan)) * fr.header.gain
        floor = 1.0 / np.sqrt(np.clip(total_e, 1, None))
        ratio = master.flat.values[i] / truth[i]
        ratio = ratio / np.median(ratio[good])
        pull = ((ratio - 1.0) / floor)[good]
        assert np.std(pull) == pytest.approx(1.0, rel=0.10), (q, np.std(pull))
    # Normalised to mean 1 over the good pixels of the whole focal plane.
    all_good = master.defects.values == 0
    assert float(master.flat.values[all_good].mean()) == pytest.approx(1.0, abs=1e-6)
    # Quadrant QE differences stay in the flat (docs/masters.md).
    q_means = [master.flat.values[i][all_good[i]].mean() for i in range(len(master.quadrant))]
    t_means = [truth[i][defects[i] == 0].mean() for i in range(len(master.quadrant))]
    np.testing.assert_allclose(q_means, t_means, rtol=5e-4)


def test_flat_ratio_histograms(one_period):
    """Daily / master flat ratio: a histogram per (quadrant, LED, night) over the
    pixels the stability numbers use, centred on the stored median, and a PNG."""
    store, _ = one_period
    (period,) = list_groups(store, "masters/flat/r")
    master = read_group(store, f"masters/flat/r/{period}")
    bias = read_group(store, f"masters/bias/{period}")
    hist = master.ratio_hist.values  # (quadrant, led, night, bin)
    centres = master.ratio_bin.values
    width = centres[1] - centres[0]
    for i in range(len(master.quadrant)):
        not_hot = int(((bias.defects.values[i] & 1) == 0).sum())
        for j in range(len(master.led)):
            for n in range(len(master.night)):
                h = hist[i, j, n]
                assert h.sum() == not_hot
                cum = np.cumsum(h)
                median = centres[np.searchsorted(cum, cum[-1] / 2)]
                assert abs(median - master.ratio_median.values[i, j, n]) <= width
    png = store.parent / f"{store.name}.qa" / "masters" / "flat" / "r" / period / "ratio_hist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert master.attrs["plots"]["ratio_hist"] == str(png)


def test_defects_are_found(survey, one_period):
    store, _ = one_period
    (period,) = list_groups(store, "masters/flat/r")
    found = read_group(store, f"masters/flat/r/{period}").defects.values
    truth = _truth(survey, "maps/defects").defects.values
    for bit in (1, 2):
        real = (truth & bit) != 0
        got = (found & bit) != 0
        assert got[real].mean() >= 0.99, bit
        assert (got & ~real).sum() / real.size < 1e-3, bit


def test_stability_flags_the_bias_jump(prefect_server, survey, tmp_path):
    """One-night periods: the second night's bias, 2 ADU higher, is flagged
    against the first (the reference); its delta map and plots are stored."""
    store = tmp_path / "p1.zarr"
    summary = _run(store, survey.raw, MastersConfig(period_days=1))
    periods = list_groups(store, "masters/bias")
    assert len(periods) == 2
    ref, later = (read_group(store, f"masters/bias/{p}") for p in periods)
    assert ref.attrs["summary"]["is_reference"]
    s = later.attrs["summary"]
    assert s["mean_delta_adu"] == pytest.approx(2.0, abs=0.1)
    assert s["flagged_quadrants"] == sorted(later.quadrant.values.tolist())
    assert later.attrs["reference_period"] == periods[0]
    assert (
        store.parent / f"{store.name}.qa" / "masters" / "bias" / periods[1] / "delta_ref.png"
    ).is_file()
    assert f"masters/bias/{periods[1]}" in summary["masters"]


def test_masters_rerun_is_idempotent(prefect_server, survey, one_period):
    store, _ = one_period
    groups = [f"masters/bias/{p}" for p in list_groups(store, "masters/bias")]
    groups += [f"masters/flat/r/{p}" for p in list_groups(store, "masters/flat/r")]
    before = {g: read_group(store, g) for g in groups}
    _run(store, survey.raw, MastersConfig())
    for g in groups:
        xr.testing.assert_identical(before[g].drop_attrs(), read_group(store, g).drop_attrs())
