"""The pipeline with its store on S3 (moto's server on loopback): index, masters
and a night's photometry written by the Prefect flow on a real two-worker Dask
cluster to s3://, equal value by value to the same stages computed in one
process on a local store; then the store copied back from S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import s3fs
import xarray as xr

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from tasks.index import index_sequentially
from tasks.io.store import read_group
from tasks.io.store_tools import copy_store, list_store
from tasks.masters import build_masters_sequentially
from tasks.reduce import reduce_night

pytestmark = pytest.mark.integration


def _same(a: xr.Dataset, b: xr.Dataset, qa_dirs: tuple[str, str] = ("", "")) -> None:
    """Equal values and attrs; the QA plots' folders (named after each store) aside,
    and input files compared by name (the flow records them with the raw root,
    reduce_night relative to it)."""
    xr.testing.assert_equal(a, b)

    def text(ds: xr.Dataset, qa_dir: str) -> str:
        attrs = dict(ds.attrs)
        if "inputs" in attrs:
            attrs["inputs"] = sorted(Path(p).name for p in attrs["inputs"])
        return json.dumps(attrs, sort_keys=True).replace(qa_dir or "\0", "QA")

    assert text(a, qa_dirs[0]) == text(b, qa_dirs[1])


@pytest.mark.slow  # 60-90 s idle: the stages on S3, then again in one process
def test_index_masters_and_photometry_on_s3(
    prefect_server, s3_store, tiny_survey, tmp_path, monkeypatch
):
    night = tiny_survey.nights[0]
    # QA plots go beside the store on S3 (tasks/qa.py), none to the working directory.
    monkeypatch.chdir(tmp_path)
    with prefect_api():
        summary = photocal_run.with_options(task_runner=make_task_runner(workers=2))(
            store=s3_store,
            raw=str(tiny_survey.raw),
            refcat=str(tiny_survey.refcat),
            nights=[night],
            stages=["index", "masters", "photometry"],
        )
    assert summary["photometry"][night]["exposures"] == 4
    groups = {g.name: g for g in list_store(s3_store)}
    assert all(g.state == "complete" and g.version == 1 for g in groups.values())
    assert {f"index/{night}", f"nights/{night}/catalog", f"nights/{night}/exposures"} <= set(groups)
    # The same stages in this process, on a local store.
    local = tmp_path / "local.zarr"
    index_sequentially(str(tiny_survey.raw), str(local))
    for other in tiny_survey.nights[1:]:  # the flow indexed the one night only
        shutil.rmtree(local / "index" / other)
    build_masters_sequentially(str(local), [night])
    reduce_night(str(local), night, str(tiny_survey.refcat))
    qa_dirs = (f"{s3_store}.qa", f"{local}.qa")
    assert not any(tmp_path.glob("photocal-*")), "QA plots written locally"
    plots = s3fs.S3FileSystem().find(f"{s3_store}.qa")
    assert any(p.endswith(".png") for p in plots), plots
    for name in groups:
        _same(read_group(s3_store, name), read_group(local, name), qa_dirs)
    # And back from S3 to a local path, unchanged.
    back = tmp_path / "back.zarr"
    assert sorted(copy_store(s3_store, str(back))) == sorted(groups)
    _same(
        read_group(back, f"nights/{night}/catalog"), read_group(s3_store, f"nights/{night}/catalog")
    )
