"""Groups built from parallel pieces become visible only when committed."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from tasks.io.store import (
    abandon_group,
    begin_group,
    commit_group,
    group_exists,
    open_staging,
    read_group,
    write_group,
    write_region,
)


def _template(nq=4, ny=6, nx=5):
    return xr.Dataset(
        {
            "bias": (
                ("quadrant", "y", "x"),
                da.zeros((nq, ny, nx), chunks=(1, ny, nx), dtype="f4"),
            ),
            "nframes": (("quadrant",), da.zeros(nq, chunks=1, dtype="i4")),
        },
        coords={"quadrant": np.arange(nq)},
    )


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_pieces_commit_atomically(tmp_path, store_kind):
    store = tmp_path / "s.zarr" if store_kind == "local" else "memory://builder-test.zarr"
    write_group(store, "masters/bias/2026-03-01", _template().compute() + 7)
    staging = begin_group(store, "masters/bias/2026-03-01", _template())
    for q in range(4):
        piece = xr.Dataset(
            {
                "bias": (("quadrant", "y", "x"), np.full((1, 6, 5), q, "f4")),
                "nframes": (("quadrant",), np.array([q + 10], "i4")),
            }
        )
        write_region(staging, piece, {"quadrant": slice(q, q + 1)})
        # Readers still see the previous complete version (or nothing, on object stores).
        if store_kind == "local":
            assert float(read_group(store, "masters/bias/2026-03-01").bias.max()) == 7
    assert float(open_staging(staging).bias.sum()) == 30 * (0 + 1 + 2 + 3)
    commit_group(store, "masters/bias/2026-03-01", staging, attrs={"stage": "masters"})
    ds = read_group(store, "masters/bias/2026-03-01")
    assert ds.attrs["stage"] == "masters"
    np.testing.assert_array_equal(ds.nframes, [10, 11, 12, 13])
    np.testing.assert_array_equal(ds.bias.max(axis=(1, 2)), [0, 1, 2, 3])


def test_abandoned_build_leaves_the_old_version(tmp_path):
    store = tmp_path / "s.zarr"
    write_group(store, "g", _template().compute() + 1)
    staging = begin_group(store, "g", _template())
    abandon_group(staging)
    assert group_exists(store, "g")
    assert float(read_group(store, "g").bias.max()) == 1
