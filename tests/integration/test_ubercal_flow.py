"""The ubercal stage through `photocal run` (Prefect flow on a LocalCluster) on
night catalogs of a catalog-level simulated survey, scored against its truth."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import main
from sim.catalogsim import CatalogSurveyConfig, simulate_catalog_survey
from tasks.io.store import read_group
from tasks.simulate import write_catalog_refcat, write_catalog_survey

pytestmark = pytest.mark.integration


def test_ubercal_stage_through_the_cli(prefect_server, tmp_path, capsys):
    survey = simulate_catalog_survey(
        CatalogSurveyConfig(
            seed=11,
            n_fields_x=2,
            n_fields_y=1,
            visits_per_field=5,
            n_nights=2,
            stars_per_quadrant=1200.0,
            mag_range=(13.0, 19.0),
            dither_fraction=0.15,
        )
    )
    store, refcat = tmp_path / "s.zarr", tmp_path / "refcat.fits"
    write_catalog_survey(store, survey)
    write_catalog_refcat(refcat, survey)
    band = survey.config.band
    assert (
        main(
            [
                "run",
                "--store",
                str(store),
                "--refcat",
                str(refcat),
                "--stages",
                "ubercal",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert f"ubercal/{band}" in capsys.readouterr().out
    sol = read_group(store, f"ubercal/{band}")
    # Truth on the solution's (expid, quadrant) grid; each quadrant's mean starflat
    # lives in its zero points (the zp/starflat degeneracy is fixed that way).
    rows = np.searchsorted(survey.exposures["expid"], sol.expid.values)
    q = sol.quadrant.values
    truth = survey.zp_true[rows][:, q] + survey.starflat_true[q].mean(axis=(1, 2))[None]
    diff = sol.zp.values - truth
    diff -= np.nanmean(diff)  # the gauge offset
    pull = diff / sol.zp_err.values
    ok = np.isfinite(pull)
    assert ok.sum() > 50
    assert 0.7 < np.std(pull[ok]) < 1.3
