"""QA plots go beside the store, on object storage too: the same PNG bytes to
a local store's folder and to an S3 store's prefix (moto's server)."""

from __future__ import annotations

import fsspec
import numpy as np

from tasks.io.objstore import storage_options
from tasks.qa import plot_histograms, plot_quadrant_maps, qa_path

GROUP = "masters/bias/2026-03-10"


def _plots(store: str) -> list:
    rng = np.random.default_rng(1)
    maps = {f"q{i}": rng.normal(size=(16, 16)) for i in range(4)}
    return [
        plot_quadrant_maps(maps, qa_path(store, GROUP, "map.png"), title="t", unit="ADU"),
        plot_histograms(
            {"a": rng.normal(size=500)}, qa_path(store, GROUP, "hist.png"), title="t", xlabel="x"
        ),
    ]


def _read(path) -> bytes:
    with fsspec.open(str(path), "rb", **storage_options(str(path))) as fh:
        return fh.read()


def test_plots_beside_a_local_and_an_s3_store_are_the_same_pngs(s3_store, tmp_path, monkeypatch):
    local = _plots(str(tmp_path / "photocal.zarr"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    remote = _plots(s3_store)
    assert [str(p) for p in local] == [
        str(tmp_path / "photocal.zarr.qa" / GROUP / n) for n in ("map.png", "hist.png")
    ]
    assert remote == [f"{s3_store}.qa/{GROUP}/{n}" for n in ("map.png", "hist.png")]
    for here, there in zip(local, remote, strict=True):
        data = _read(there)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data == _read(here)
    # Nothing written locally for the S3 store (before: a folder named after the
    # bucket, in the working directory).
    assert list(cwd.iterdir()) == []
