"""Where tasks run: a local Dask cluster by default, or an existing scheduler."""

from __future__ import annotations

from prefect_dask import DaskTaskRunner


def make_task_runner(
    *, dask_address: str | None = None, workers: int | None = None
) -> DaskTaskRunner:
    """A Dask task runner.

    Parameters
    ----------
    dask_address : str, optional
        ``tcp://host:port`` of a running ``dask scheduler``; the cluster is used
        as it is (its workers are scaled by the cluster operator).
    workers : int, optional
        Worker processes of the local cluster started otherwise (default 2).
    """
    if dask_address is not None and workers is not None:
        raise ValueError("give either dask_address or workers, not both")
    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    n = 2 if workers is None else workers
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": n,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",  # any free port: several runs may share a host
        }
    )
