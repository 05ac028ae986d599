"""The ubercal stage end to end on a store filled with catalog-level simulated
night catalogs: read nights/*/catalog, anchor to the refcat, write ubercal/<band>."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError
from statchecks import assert_fails, assert_unit_pulls

import tasks.ubercal
from calib.ubercal import UbercalError, UbercalOptions
from sim.catalogsim import CatalogSurveyConfig, simulate_catalog_survey
from tasks.io.store import StoreError, read_group
from tasks.simulate import write_catalog_refcat, write_catalog_survey
from tasks.ubercal import UbercalOptionsConfig, UbercalStageConfig, run_ubercal_stage, write_png


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ubercal")
    survey = simulate_catalog_survey(
        CatalogSurveyConfig(
            seed=7,
            n_fields_x=2,
            n_fields_y=1,
            visits_per_field=6,
            n_nights=3,
            stars_per_quadrant=1500.0,
            mag_range=(13.0, 19.0),
            dither_fraction=0.15,
        )
    )
    store = root / "store.zarr"
    write_catalog_survey(store, survey)
    refcat = root / "refcat.fits"
    write_catalog_refcat(refcat, survey)
    return survey, store, refcat


def check_zero_points_against_truth(ds, survey) -> None:
    """Zero points match the truth after the gauge offset, within their own
    errors: pulls of unit width, two-sided (the chi-square band of n values), so
    errors that are too large fail as surely as errors that are too small."""
    rows = np.searchsorted(survey.exposures["expid"], ds.expid.values)
    truth = survey.zp_true[rows][:, ds.quadrant.values]
    # Each quadrant's mean starflat lives in its zero points (the gauge).
    truth = truth + survey.starflat_true[ds.quadrant.values].mean(axis=(1, 2))[None]
    d = ds.zp.values - truth
    d -= np.nanmean(d)
    pull = (d / ds.zp_err.values).ravel()
    assert np.isfinite(pull).sum() > 100
    assert_unit_pulls(pull, label="ubercal zero-point pulls")


@pytest.fixture(scope="module")
def solved(filled):
    """The stage over every night; its summary and the group it wrote, loaded
    (later tests rewrite the group)."""
    _, store, refcat = filled
    out = run_ubercal_stage(store, refcat, UbercalStageConfig(band="r"))
    return out, read_group(store, "ubercal/r").load()


@pytest.mark.parametrize(
    "perturb",
    [
        lambda ds: ds.assign(zp_err=2 * ds.zp_err),
        lambda ds: ds.assign(zp_err=0.5 * ds.zp_err),
        lambda ds: ds.assign(zp_err=ds.zp_err / 1000.0),
        lambda ds: ds.assign(zp=ds.zp + 3 * ds.zp_err * np.sign(np.sin(ds.expid % 7))),
    ],
    ids=["errors x2", "errors / 2", "errors in mmag as mag", "3-sigma zero-point errors"],
)
def test_zero_point_check_fails_on_wrong_errors(filled, solved, perturb):
    survey, _, _ = filled
    _, ds = solved
    assert_fails(check_zero_points_against_truth, perturb(ds), survey)


def test_zero_point_check_fails_when_the_solver_doubles_its_errors(filled, monkeypatch):
    """The code perturbed: the stage's solver reports errors x2."""
    survey, store, refcat = filled
    solve = tasks.ubercal.solve_ubercal

    def doubled(*args, **kwargs):
        sol = solve(*args, **kwargs)
        return dataclasses.replace(sol, zp_err_mag=2 * sol.zp_err_mag)

    monkeypatch.setattr(tasks.ubercal, "solve_ubercal", doubled)
    run_ubercal_stage(store, refcat, UbercalStageConfig(band="r", plots=False))
    assert_fails(check_zero_points_against_truth, read_group(store, "ubercal/r"), survey)


def test_stage_writes_the_ubercal_group(filled, solved, tmp_path):
    survey, _, _ = filled
    out, ds = solved
    assert out["group"] == "ubercal/r"
    assert len(out["nights"]) == 3
    assert ds.zp.dims == ("expid", "quadrant")
    assert ds.starflat.dims == ("quadrant", "cell_y", "cell_x")
    assert ds.star_mag.dims == ("source_id",)
    np.testing.assert_array_equal(np.sort(ds.expid.values), survey.exposures["expid"])
    stats = ds.attrs["fit_statistics"]
    assert 0.9 < stats["chi2_per_dof"] < 1.15
    assert stats["iterations"] >= 2
    assert stats["n_rejected"] > 0
    assert ds.attrs["config"]["band"] == "r"
    # The model was sized to the data (auto) and the decision recorded.
    assert ds.attrs["config"]["options"]["zp_mode"] == "auto"
    assert ds.attrs["options"]["zp_mode"] == "exposure_quadrant"
    assert ds.attrs["sizing"]["zp_mode_rule"] == "auto"
    assert ds.attrs["sizing"]["cells"] == list(ds.starflat.shape[1:])
    assert "exposure-quadrant" in out["model"]
    assert ds.attrs["inputs"]["nights"] == out["nights"]
    assert ds.attrs["qa"]["repeatability_bright_median_mag"] < 0.01
    check_zero_points_against_truth(ds, survey)
    # The plots are PNG files.
    for name in ("starflat_png", "residual_png"):
        png = write_png(ds, name, tmp_path / f"{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_night_range_selects_catalogs(filled):
    survey, store, refcat = filled
    nights = sorted(set(survey.exposures["night"]))
    out = run_ubercal_stage(
        store,
        refcat,
        UbercalStageConfig(
            band="r", first_night=nights[1], plots=False, options=UbercalOptions(cells=(4, 4))
        ),
    )
    assert out["nights"] == nights[1:]
    ds = read_group(store, "ubercal/r")
    assert set(ds.expid.values) == set(
        survey.exposures["expid"][survey.exposures["night"] != nights[0]]
    )
    assert "starflat_png" not in ds


def test_no_catalogs_in_range(filled):
    _, store, refcat = filled
    with pytest.raises(StoreError, match="no night catalogs"):
        run_ubercal_stage(store, refcat, UbercalStageConfig(band="r", first_night="2030-01-01"))


def test_band_without_observations_is_named(filled):
    """The store holds band r only: asking for g gives an error naming the band
    and the group, not a numpy cast error from an empty system."""
    _, store, refcat = filled
    with pytest.raises(UbercalError, match=r"ubercal/g \(band 'g'.*none to fit"):
        run_ubercal_stage(store, refcat, UbercalStageConfig(band="g", plots=False))


def test_every_option_is_described_and_validated():
    """The stage model carries a description for every fit option (for the
    configuration file's comments), the same defaults as UbercalOptions, and the
    dataclass's own checks."""
    fields = UbercalOptionsConfig.model_fields
    assert set(fields) == {f.name for f in dataclasses.fields(UbercalOptions)}
    for name, info in fields.items():
        assert len(info.description or "") > 10, name
        assert info.default == getattr(UbercalOptions(), name), name
    cfg = UbercalStageConfig(band="r", options=UbercalOptions(cells=(4, 4), clip_sigma=4.0))
    assert cfg.fit_options == UbercalOptions(cells=(4, 4), clip_sigma=4.0)
    assert UbercalStageConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValidationError, match="clip_sigma must be > 0"):
        UbercalStageConfig(band="r", options={"clip_sigma": -1.0})
    with pytest.raises(ValidationError, match="nope"):
        UbercalStageConfig(band="r", options={"nope": 1})


def test_auto_scheduler_is_the_cluster_on_a_dask_worker_and_threads_elsewhere():
    from distributed import Client, LocalCluster

    assert tasks.ubercal.resolved_scheduler("auto") == "threads"
    assert tasks.ubercal.resolved_scheduler("synchronous") == "synchronous"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        on_worker = client.submit(tasks.ubercal.resolved_scheduler, "auto").result()
        chosen = client.submit(tasks.ubercal.resolved_scheduler, "threads").result()
    assert (on_worker, chosen) == ("distributed", "threads")
    assert UbercalStageConfig(band="r").scheduler == "auto"
