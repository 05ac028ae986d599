"""Each stage's input, night by night: what is missing, incomplete or unusable
is named with the reason (the flow lists or fails on it)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tasks.inputs import (
    MissingInputError,
    check_stage_inputs,
    raise_for_missing,
    unbuilt_masters,
)
from tasks.io.store import write_group


def _index(status: list[str], imagetyp: list[str]) -> xr.Dataset:
    return xr.Dataset({"status": ("file", status), "imagetyp": ("file", imagetyp)})


@pytest.fixture
def store(tmp_path):
    s = str(tmp_path / "s.zarr")
    write_group(s, "index/2026-03-10", _index(["ok", "ok"], ["BIAS", "SCIENCE"]))
    write_group(s, "index/2026-03-11", _index(["rejected"], ["SCIENCE"]))
    cat = xr.Dataset({"expid": ("obs", np.zeros(2, np.int64))})
    write_group(s, "nights/2026-03-10/catalog", cat, attrs={"quad_nx": 8, "quad_ny": 8})
    write_group(s, "nights/2026-03-10/exposures", xr.Dataset({"expid": ("exposure", [0])}))
    write_group(s, "nights/2026-03-11/catalog", cat)  # no quadrant size
    cat.to_zarr(
        s, group="nights/2026-03-12/catalog", mode="w", zarr_format=3, consolidated=False
    )  # by hand
    return s


def test_each_night_gets_its_reason(store):
    ok, missing = check_stage_inputs(store, "ubercal", None)
    assert ok == ["2026-03-10"]
    reasons = {m["night"]: (m["group"], m["reason"]) for m in missing}
    assert reasons["2026-03-11"][0] == "nights/2026-03-11/catalog"
    assert "lacks the quad_nx/quad_ny attrs" in reasons["2026-03-11"][1]
    assert reasons["2026-03-12"][0] == "nights/2026-03-12/catalog"
    assert reasons["2026-03-12"][1].startswith("is incomplete (no photocal_complete attr")


def test_named_nights_that_do_not_exist_are_missing(store):
    ok, missing = check_stage_inputs(
        store, "photometry", ["2026-03-10", "2026-03-11", "2026-03-20"]
    )
    assert ok == ["2026-03-10"]
    by_night = {m["night"]: m for m in missing}
    assert by_night["2026-03-11"]["reason"].startswith("has no usable science exposure")
    assert by_night["2026-03-20"]["group"] == "index/2026-03-20"
    assert by_night["2026-03-20"]["reason"].startswith("is missing (run the index stage")


def test_a_period_without_bias_frames_is_named():
    missing = unbuilt_masters(
        ["2026-03-10", "2026-04-01"], lambda n: n[:7] + "-01", ["masters/bias/2026-03-01"]
    )
    assert [(m["night"], m["group"]) for m in missing] == [
        ("2026-04-01", "masters/bias/2026-04-01")
    ]


def test_named_nights_fail_the_run_a_range_only_lists_them():
    summary = {
        "missing": [{"stage": "ubercal", "night": "n", "group": "g", "reason": "is missing"}]
    }
    with pytest.raises(MissingInputError, match="ubercal on n: g is missing") as err:
        raise_for_missing(summary, named=True)
    assert err.value.summary is summary
    raise_for_missing(summary, named=False)  # a range: listed only
    summary["missing"].append({"stage": "masters", "night": "-", "group": "i", "reason": "r"})
    with pytest.raises(MissingInputError):  # a stage with nothing at all fails either way
        raise_for_missing(summary, named=False)
