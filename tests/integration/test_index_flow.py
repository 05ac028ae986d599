"""The walking skeleton end to end: the Prefect flow on a real two-worker Dask
LocalCluster, against Prefect's test server, on the tiny simulated survey."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import xarray as xr

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from tasks.io.store import list_groups, read_group

pytestmark = pytest.mark.integration


def _run(store, raw, **kwargs):
    with prefect_api():
        return photocal_run.with_options(task_runner=make_task_runner(workers=2))(
            store=str(store), raw=str(raw), **{"stages": ["index"], **kwargs}
        )


def _sha(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_index_flow_on_tiny(prefect_server, tiny_survey, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_survey.raw, raw)
    before = _sha(raw)
    store = tmp_path / "photocal.zarr"

    summary = _run(store, raw)

    truth = xr.open_zarr(tiny_survey.truth, group="exposures", consolidated=False)
    truth = truth.load().to_dataframe().set_index("expid")
    nights = sorted(set(truth.night))
    assert list_groups(store, "index") == sorted([*nights, "unknown-night"])
    for night in nights:
        idx = read_group(store, f"index/{night}")
        table = idx.to_dataframe()
        ok = table[table.status == "ok"].set_index("expid")
        want = truth[truth.night == night]
        # Every good file of the night is indexed, with its header facts.
        assert sorted(ok.index) == sorted(want.index)
        assert (ok.imagetyp == want.imagetyp.loc[ok.index]).all()
        np.testing.assert_allclose(ok.mjd, want.mjd.loc[ok.index], atol=1e-7)
        assert (ok.path == want.path.loc[ok.index]).all()
        assert idx.attrs["stage"] == "index"
        assert "photocal_version" in idx.attrs
    # Every damaged file is recorded as rejected with its reason, in some night.
    rejected = {path.split("/")[-1]: reason for path, reason in summary["rejected"]}
    expected = {
        "bad_truncated.fits": "truncated",
        "bad_missing_keyword.fits": "MJD-OBS",
        "bad_not_fits.fits": "FITS",
        "bad_unknown_imagetyp.fits": "FOCUS",
        "bad_bad_section.fits": "DATASEC",
    }
    assert set(rejected) == set(expected)
    for name, word in expected.items():
        assert word in rejected[name]
    stored = np.concatenate(
        [read_group(store, f"index/{n}").reason.values for n in list_groups(store, "index")]
    )
    assert sum(bool(r) for r in stored) == len(expected)
    # Raw data are never modified.
    assert _sha(raw) == before

    # Idempotent: a second run rewrites the same groups to the same values.
    first = {n: read_group(store, f"index/{n}") for n in list_groups(store, "index")}
    _run(store, raw)
    for n, ds in first.items():
        again = read_group(store, f"index/{n}")
        xr.testing.assert_identical(ds.drop_attrs(), again.drop_attrs())


def test_index_flow_limited_to_one_night(prefect_server, tiny_survey, tmp_path):
    truth = xr.open_zarr(tiny_survey.truth, group="exposures", consolidated=False)
    night = str(truth.night.values[-1])
    store = tmp_path / "one.zarr"
    summary = _run(store, tiny_survey.raw, nights=[night])
    assert set(summary["nights"]) == {night, "unknown-night"}
    assert list_groups(store, "index") == sorted([night, "unknown-night"])


def test_flow_refuses_unknown_stage_and_missing_raw(prefect_server, tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        _run(tmp_path / "s.zarr", tmp_path, stages=["index", "teleport"])
    with prefect_api(), pytest.raises(ValueError, match="--raw"):
        photocal_run(store=str(tmp_path / "s.zarr"), raw=None)
