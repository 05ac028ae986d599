"""The transients stage through the Prefect flow on a LocalCluster: one
training task, scoring tasks per pair, transients/<night> written."""

from __future__ import annotations

import numpy as np
import pytest

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from tasks.io.store import read_group
from tasks.transients import TransientsConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_transients_stage_writes_each_night(prefect_server, tmp_path):
    config = TransientsConfig(quadrant_px=512, pairs_per_night=2, train_pairs=2, epochs=1)
    nights = ["2026-03-10", "2026-03-11"]
    with prefect_api():
        summary = photocal_run.with_options(task_runner=make_task_runner(workers=2))(
            store=str(tmp_path / "s.zarr"), nights=nights, stages=["transients"], transients=config
        )
    out = summary["transients"]
    assert sorted(out["nights"]) == nights
    assert out["gpu_workers"] == []
    for night in nights:
        ds = read_group(tmp_path / "s.zarr", f"transients/{night}")
        assert ds.sizes["pair_index"] == 2
        assert out["nights"][night]["injected"] == int(ds.n_injected.sum())
        assert set(np.unique(ds.method.values)) <= {"heatmap", "classical"}
    # Each night has its own pairs.
    a, b = (read_group(tmp_path / "s.zarr", f"transients/{n}").seed.values for n in nights)
    assert not np.intersect1d(a, b).size
