"""The local cluster spec as the flows start it: a real LocalCluster."""

from __future__ import annotations

import os

import pytest
from distributed import Client, LocalCluster

from flows.runners import make_task_runner

pytestmark = pytest.mark.integration


def _trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_keep_glibc_adaptive_malloc(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ for worker processes (it switches off
    glibc's adaptive mmap threshold and cost the photometry 30 %) is unset by the
    local spec; the one-thread BLAS settings stay."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    runner = make_task_runner(workers=1)
    kwargs = {**runner.cluster_kwargs, "n_workers": 1}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        trim = client.run(_trim_threshold)
        blas = client.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS"))
    assert list(trim.values()) == [None]
    assert list(blas.values()) == ["1"]
