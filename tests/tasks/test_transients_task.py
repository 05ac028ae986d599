"""The transients stage without Prefect: trains a small localiser, scores a
night's simulated pairs and writes transients/<night> through the store."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.io.store import read_group
from tasks.transients import TransientsConfig, pair_seed, run_transients_night

TINY = TransientsConfig(quadrant_px=512, pairs_per_night=2, train_pairs=2, epochs=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("transients") / "store.zarr")
    summary = run_transients_night(store, "2026-03-10", TINY)
    return store, summary


def test_group_holds_detections_of_both_methods(written):
    store, summary = written
    ds = read_group(store, "transients/2026-03-10")
    assert list(ds.methods.values) == ["heatmap", "classical"]
    assert set(np.unique(ds.method.values)) <= {"heatmap", "classical"}
    for var in ("x", "y", "score", "delta_mag", "mag_change", "pair"):
        assert ds[var].dims == ("detection",)
    assert np.all((ds.x >= 0) & (ds.x <= 511))
    classical = ds.method.values == "classical"
    assert np.all(ds.score.values[classical] >= TINY.classical_threshold)
    np.testing.assert_array_equal(
        ds.seed.values, [pair_seed(TINY, "2026-03-10", i) for i in (0, 1)]
    )
    assert ds.attrs["config"]["pairs_per_night"] == 2
    # The summary is the group's counts; the classical baseline finds most of
    # the injected transients (S/N 3..100, the faintest below its threshold).
    assert summary["injected"] == int(ds.n_injected.sum())
    assert summary["classical"]["found"] == int(ds.n_found.sel(methods="classical").sum())
    assert summary["classical"]["found"] >= 0.6 * summary["injected"]
    for m in ("heatmap", "classical"):
        n_det = int((ds.method.values == m).sum())
        assert int(ds.n_false.sel(methods=m).sum()) <= n_det


def test_rerun_writes_the_same_group(written, tmp_path):
    store, _ = written
    first = read_group(store, "transients/2026-03-10")
    other = str(tmp_path / "again.zarr")
    run_transients_night(other, "2026-03-10", TINY)
    again = read_group(other, "transients/2026-03-10")
    for var in ("x", "y", "method", "n_found"):
        np.testing.assert_array_equal(again[var].values, first[var].values)
