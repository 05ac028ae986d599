"""GPU routing on a real cluster: `dask scheduler` and two `dask worker`
processes, one started with `--resources GPU=1`."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from distributed import Client

from flows.api import prefect_api
from flows.deployments import device_check
from flows.runners import make_task_runner
from flows.serve import free_port

pytestmark = pytest.mark.integration
DASK = [sys.executable, "-m", "distributed.cli"]


@contextmanager
def dask_cluster(worker_resources: list[str | None]):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        for i, res in enumerate(worker_resources):
            cmd = [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-nanny",
                "--name",
                f"w{i}",
                "--dashboard-address",
                ":0",
                "--host",
                "127.0.0.1",
            ]
            if res:
                cmd += ["--resources", res]
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as c:
                    if len(c.scheduler_info()["workers"]) == len(worker_resources):
                        info = c.scheduler_info()["workers"]
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("dask workers did not register")
            time.sleep(0.5)
        yield address, info
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _check(address):
    with prefect_api():
        return device_check.with_options(task_runner=make_task_runner(dask_address=address))(
            n_gpu_tasks=6, n_cpu_tasks=6
        )


def test_gpu_marked_tasks_run_only_on_the_gpu_worker(prefect_server):
    with dask_cluster([None, "GPU=1"]) as (address, workers):
        gpu_addr = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
        results = _check(address)
    marked = [r for r in results if r["label"].startswith("gpu-")]
    plain = [r for r in results if r["label"].startswith("cpu-")]
    assert len(marked) == 6
    assert {r["worker"] for r in marked} == {gpu_addr}
    # Unmarked work may use either worker; every probe reports a torch device.
    assert all(r["device"] in ("cpu", "cuda") for r in plain + marked)


def test_without_gpu_workers_marked_tasks_fall_back_to_cpu(prefect_server):
    with dask_cluster([None, None]) as (address, workers):
        results = _check(address)
    assert len(results) == 12
    assert {r["worker"] for r in results} <= set(workers)
