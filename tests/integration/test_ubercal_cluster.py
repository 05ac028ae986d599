"""The iterative ubercal fit on a real multi-process Dask cluster (a `dask
scheduler` and two `dask worker` processes started here): the night catalogs
are read on the workers, the star-complete partitions stay there, and the zero
points equal those of the same fit in this process."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, get_task_stream
from test_gpu_routing import dask_cluster  # the real scheduler + workers, started as processes

from calib.ubercal import ObservationChunk, UbercalOptions, solve_ubercal
from sim.catalogsim import CatalogSurveyConfig, simulate_catalog_survey
from tasks.simulate import write_catalog_refcat, write_catalog_survey
from tasks.ubercal import NightCatalogs, _reference

# A few minutes on the shared 2-core machine (hundreds of small cluster tasks).
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_iterative_fit_on_a_cluster_matches_in_process(tmp_path):
    survey = simulate_catalog_survey(
        CatalogSurveyConfig(
            seed=13,
            n_fields_x=2,
            n_fields_y=1,
            visits_per_field=4,
            n_nights=2,
            stars_per_quadrant=800.0,
            mag_range=(13.0, 19.0),
            dither_fraction=0.15,
        )
    )
    store, refcat = tmp_path / "s.zarr", tmp_path / "refcat.fits"
    write_catalog_survey(store, survey)
    write_catalog_refcat(refcat, survey)
    nights = tuple(sorted(set(survey.exposures["night"])))
    # Four partitions over two workers; a few thousand observations each.
    opts = UbercalOptions(solver="iterative", partition_obs=survey.n_obs // 4 + 1, cells=(4, 4))
    quad = {"quad_nx": survey.config.quad_nx, "quad_ny": survey.config.quad_ny}
    reference = _reference(refcat, "r")
    local = solve_ubercal(
        ObservationChunk.from_mapping(survey.observations),
        reference=reference,
        options=opts,
        **quad,
    )
    with dask_cluster([None, None]) as (address, workers), Client(address) as client:
        source = NightCatalogs(str(store), nights, "r", client=client)
        with get_task_stream(client) as ts:
            remote = solve_ubercal(source, reference=reference, options=opts, **quad)
        # The partitions were built on both workers (and applied there).
        built = {t["worker"] for t in ts.data if "_build_from_pieces" in str(t["key"])}
        assert built == set(workers)
    assert remote.stats.solver == f"pcg-{opts.preconditioner}"
    assert remote.stats.n_used == local.stats.n_used
    np.testing.assert_array_equal(remote.expids, local.expids)
    # PCG stops at a relative residual of 1e-9; the two runs differ in the order of
    # the sums only, so 1e-6 mag is three orders above what they can disagree by.
    np.testing.assert_allclose(remote.zp_mag, local.zp_mag, atol=1e-6)
    np.testing.assert_allclose(remote.star_mag, local.star_mag, atol=1e-6)
