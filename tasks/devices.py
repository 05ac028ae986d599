"""GPU routing: tasks that want a GPU are submitted with the Dask resource
annotation ``GPU=1`` when some worker advertises it (``dask worker --resources
GPU=1``), and run on any worker otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask
from distributed import get_client, get_worker
from prefect import task

from ml.device import describe_device

GPU_RESOURCE = "GPU"


def gpu_workers() -> list[str]:
    """Addresses of the workers that advertise a GPU (from inside a task)."""
    info = get_client().scheduler_info(n_workers=-1)
    return sorted(
        addr
        for addr, w in info["workers"].items()
        if w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1
    )


@task(name="find-gpu-workers", retries=1)
def gpu_workers_task() -> list[str]:
    return gpu_workers()


@contextlib.contextmanager
def on_gpu_if_any(gpu_addresses: list[str]) -> Iterator[None]:
    """Annotate submissions inside the block to need a GPU, if the cluster has one;
    without GPU workers the work runs on CPU workers instead of waiting forever."""
    if gpu_addresses:
        with dask.annotate(resources={GPU_RESOURCE: 1}):
            yield
    else:
        yield


@task(name="probe-device")
def probe_device_task(label: str) -> dict[str, Any]:
    """Where this task ran and what torch sees there."""
    return {"label": label, "worker": get_worker().address, **describe_device()}
