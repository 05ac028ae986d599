"""A store writer run as a separate process by test_store_faults.py: it rewrites one
group over and over, so that the tests can SIGKILL it mid-write or run two at once.

    python store_writer.py STORE GROUP WRITER_ID N_VERSIONS [SIZE]

Version ``v`` of writer ``w`` fills every array with ``1000 * w + v`` and records
both in the group's attrs; odd versions go through ``write_group``, even ones are
built in pieces (``begin_group`` / ``write_region`` / ``commit_group``), the two
ways stages write. Before and after each version it prints ``start V TIME`` (the
Unix time it started) / ``done V SECONDS`` on stdout.
"""

from __future__ import annotations

import sys
import time

import dask.array as da
import numpy as np
import xarray as xr

from tasks.io.store import begin_group, commit_group, write_group, write_region

N_VARS = 6
SIZE = int(sys.argv[5]) if len(sys.argv) > 5 else 128  # smaller on the S3 server
SHAPE = (8, SIZE, SIZE)  # (quadrant, y, x): 8 chunks of SIZE x SIZE per variable
CHUNKS = (1, SIZE, SIZE)
DIMS = ("quadrant", "y", "x")


def content(value: float) -> xr.Dataset:
    return xr.Dataset(
        {f"v{k}": (DIMS, np.full(SHAPE, value, dtype=np.float64)) for k in range(N_VARS)}
    )


def write_pieced(store: str, group: str, ds: xr.Dataset, attrs: dict) -> None:
    template = xr.Dataset(
        {
            name: (var.dims, da.zeros(SHAPE, chunks=CHUNKS, dtype=np.float64))
            for name, var in ds.data_vars.items()
        }
    )
    staging = begin_group(store, group, template)
    for q in range(SHAPE[0]):
        region = {"quadrant": slice(q, q + 1)}
        write_region(staging, ds.isel(region), region)
    commit_group(store, group, staging, attrs=attrs)


def main(store: str, group: str, writer: int, n_versions: int) -> None:
    for version in range(1, n_versions + 1):
        value = 1000.0 * writer + version
        attrs = {"writer": writer, "version": version}
        print(f"start {version} {time.time():.6f}", flush=True)
        t0 = time.perf_counter()
        if version % 2:
            write_group(
                store,
                group,
                content(value).chunk(dict(zip(DIMS, CHUNKS, strict=True))),
                attrs=attrs,
            )
        else:
            write_pieced(store, group, content(value), attrs)
        print(f"done {version} {time.perf_counter() - t0:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
