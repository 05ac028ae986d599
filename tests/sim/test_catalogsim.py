"""The catalog-level survey simulation: deterministic, a real tiled geometry,
noise and truth consistent with each other."""

from __future__ import annotations

import numpy as np
import pytest

from sim.catalogsim import CatalogSurveyConfig, plan_catalog_survey, simulate_catalog_survey

SMALL = CatalogSurveyConfig(
    seed=4,
    n_fields_x=2,
    n_fields_y=2,
    visits_per_field=4,
    n_nights=2,
    stars_per_quadrant=800.0,
    mag_range=(13.0, 20.0),
)


@pytest.fixture(scope="module")
def survey():
    return simulate_catalog_survey(SMALL)


def test_deterministic(survey):
    again = simulate_catalog_survey(SMALL)
    for k, v in survey.observations.items():
        np.testing.assert_array_equal(again.observations[k], v)
    np.testing.assert_array_equal(again.zp_true, survey.zp_true)
    other = simulate_catalog_survey(SMALL.replace(seed=5))
    assert not np.array_equal(
        other.observations["mag_inst"][:100], survey.observations["mag_inst"][:100]
    )


def test_geometry_of_a_tiled_dithered_survey(survey):
    o, cfg = survey.observations, survey.config
    assert set(np.unique(o["quadrant"])) == set(survey.quadrants.tolist())
    assert len(survey.quadrants) == 16
    assert o["x"].min() >= -0.5
    assert o["x"].max() < cfg.quad_nx - 0.5
    assert o["y"].min() >= -0.5
    assert o["y"].max() < cfg.quad_ny - 0.5
    assert len(survey.exposures["expid"]) == 4 * 4
    # One observation per star and exposure.
    pairs = o["expid"].astype(np.int64) * 10**17 + (o["source_id"] - 10**15)
    assert len(np.unique(pairs)) == len(pairs)
    # Stars are seen where the pointing puts them: most stars stay in one field,
    # a few per cent sit in the overlaps (no random star-exposure assignment).
    field = survey.exposures["field"][np.searchsorted(survey.exposures["expid"], o["expid"])]
    sid, inv = np.unique(o["source_id"], return_inverse=True)
    fmin = np.full(len(sid), 99)
    fmax = np.full(len(sid), -1)
    np.minimum.at(fmin, inv, field)
    np.maximum.at(fmax, inv, field)
    multi = np.mean(fmin != fmax)
    assert 0.01 < multi < 0.35
    # Dithers move a star across starflat cells between visits.
    cell = (
        o["quadrant"] * 100 + (o["y"] // (cfg.quad_ny / 10)) * 10 + o["x"] // (cfg.quad_nx / 10)
    ).astype(int)
    first = np.full(len(sid), -1)
    first[inv[::-1]] = cell[::-1]
    assert np.mean(cell != first[inv]) > 0.5


def test_noise_and_truth_agree(survey):
    o, t = survey.observations, survey.truth
    model = t["mag_true"] - t["zp_true"] - t["dzp_true"]
    sigma = np.hypot(o["mag_inst_err"], survey.config.noise_floor_mag)
    pull = ((o["mag_inst"] - model) / sigma)[~t["is_cosmic"]]
    assert abs(pull.mean()) < 0.02
    assert 0.97 < pull.std() < 1.03
    np.testing.assert_allclose(o["mag_inst"], -2.5 * np.log10(o["flux"] / survey.config.exptime_s))
    # Selected on the expected S/N: the measured one scatters around it.
    assert np.mean(o["flux"] / o["flux_err"] < 3.0) < 0.01
    # Cosmic rays only brighten.
    assert np.all((o["mag_inst"] - model)[t["is_cosmic"]] < 5 * sigma[t["is_cosmic"]])


def test_clouds_only_on_cloudy_nights(survey):
    ex = survey.exposures
    first = ex["night"] == sorted(set(ex["night"]))[0]
    assert np.all(ex["cloud_mag"][first] == 0)
    assert np.all(ex["cloud_mag"][~first] > 0)  # the second night is cloudy
    # Quadrant zero points of one exposure differ (static offsets, cloud gradient).
    zp = survey.zp_true[:, survey.quadrants]
    assert np.all(zp.std(axis=1) > 0.005)


def test_config_checked():
    with pytest.raises(ValueError, match="band"):
        CatalogSurveyConfig(band="z")
    with pytest.raises(ValueError, match="visits_per_field"):
        CatalogSurveyConfig(visits_per_field=0)


def test_plan_draws_the_same_catalogs_one_exposure_at_a_time(survey):
    """The plan (what a survey of any size is generated from) gives each
    exposure's catalog alone, in any order, equal to the whole survey's rows."""
    plan = plan_catalog_survey(SMALL)
    np.testing.assert_array_equal(plan.zp_true, survey.zp_true)
    for e in (7, 0, plan.n_exposures - 1):
        cat = plan.exposure_catalog(e)
        rows = survey.observations["expid"] == survey.exposures["expid"][e]
        assert rows.sum() == len(cat["expid"]) > 0
        for k, v in survey.observations.items():
            np.testing.assert_array_equal(cat[k], v[rows])
        np.testing.assert_array_equal(cat["is_cosmic"], survey.truth["is_cosmic"][rows])
