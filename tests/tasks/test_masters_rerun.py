"""A quadrant task that Dask re-runs after its group was committed (it recomputes
lost results when a worker dies) must not fail nor write again."""

from __future__ import annotations

import xarray as xr

from tasks.index import index_sequentially
from tasks.io.store import begin_group, read_group
from tasks.masters import (
    MastersConfig,
    bias_template,
    build_bias_quadrants,
    build_flat_quadrants,
    build_masters_sequentially,
    commit_bias,
    flat_levels,
    flat_template,
    frame_levels,
    plan_periods,
)


def test_pieces_rerun_after_commit_return_the_committed_numbers(tiny_survey, tmp_path):
    store = str(tmp_path / "s.zarr")
    index_sequentially(str(tiny_survey.raw), store)
    config = MastersConfig()
    (plan,) = plan_periods(store, None, config)
    staging = begin_group(store, f"masters/bias/{plan.period}", bias_template(plan))
    first = build_bias_quadrants(store, plan, plan.quadrants, staging, None, config)
    commit_bias(store, plan, staging, first, None, config)
    before = read_group(store, f"masters/bias/{plan.period}")
    again = build_bias_quadrants(store, plan, plan.quadrants, staging, None, config)
    assert again == first
    xr.testing.assert_identical(before, read_group(store, f"masters/bias/{plan.period}"))

    summaries = build_masters_sequentially(store)
    band = next(iter(plan.flats))
    levels = frame_levels([flat_levels(store, plan, band, plan.quadrants, config)])
    stale = begin_group(store, f"masters/flat/{band}/{plan.period}", flat_template(plan, band))
    fresh = build_flat_quadrants(store, plan, band, plan.quadrants, stale, levels, config)
    # A staging that was never committed is a normal build; simulate the
    # committed case with the staging location of the real, committed build.
    assert summaries[f"masters/flat/{band}/{plan.period}"]["normalisation"] > 0
    committed = read_group(store, f"masters/flat/{band}/{plan.period}")
    rerun = build_flat_quadrants(
        store, plan, band, plan.quadrants, "/nonexistent/staging", levels, config
    )
    for q in plan.quadrants:
        assert rerun[q][1] == fresh[q][1]
        assert abs(rerun[q][0] - fresh[q][0]) <= 1e-4 * abs(fresh[q][0])
    xr.testing.assert_identical(committed, read_group(store, f"masters/flat/{band}/{plan.period}"))
