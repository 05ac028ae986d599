"""Worker loss without recomputation: a Dask worker SIGKILLed once half of a
night's photometry chunks have finished, and workers retiring at the end of
their lifetime (a Slurm walltime), on a real LocalCluster. Every real
computation of a chunk is counted in the worker processes (a worker plugin,
installed again on the workers the nanny restarts)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import dask
import pytest
import xarray as xr
from distributed import Client, LocalCluster, WorkerPlugin
from prefect_dask import DaskTaskRunner

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from tasks.index import index_sequentially
from tasks.io.store import read_group
from tasks.lifetime import DRAIN_REASON
from tasks.masters import build_masters_sequentially
from tasks.reduce import ReduceConfig, reduce_night

pytestmark = pytest.mark.integration


class CountChunks(WorkerPlugin):
    """Wrap tasks.reduce.photometer_chunk in the worker process: a ``start`` and
    a ``done`` line per real computation (its first file, the time) in ``log``,
    and a ``kept`` line per result served from the store by tasks/resume.py.
    ``floor_s`` makes each computation last at least that long (a tiny-preset
    exposure takes about a second; real ones minutes)."""

    def __init__(self, log: str, floor_s: float = 0.0) -> None:
        self.log = log
        self.floor_s = floor_s

    def setup(self, worker) -> None:
        import tasks.io.store as store_io
        import tasks.reduce as reduce
        import tasks.resume as resume

        real = getattr(reduce.photometer_chunk, "__wrapped__", reduce.photometer_chunk)
        load = getattr(store_io.load_task_result, "__wrapped__", store_io.load_task_result)
        log, floor_s = self.log, self.floor_s

        def line(kind: str, what: str) -> None:
            with open(log, "a") as fh:
                fh.write(f"{kind} {what} {time.time():.3f}\n")

        def counted(store, raw_root, relpaths, *args, **kwargs):
            line("start", relpaths[0])
            t0 = time.monotonic()
            out = real(store, raw_root, relpaths, *args, **kwargs)
            time.sleep(max(0.0, floor_s - (time.monotonic() - t0)))
            line("done", relpaths[0])
            return out

        def loaded(store, run, key):
            payload = load(store, run, key)
            if payload is not None:
                line("kept", key)
            return payload

        counted.__wrapped__ = real
        loaded.__wrapped__ = load
        reduce.photometer_chunk = counted
        # Both names: a task function that Prefect ships by value (cloudpickle)
        # looks its globals up again by their home module when it arrives.
        resume.load_task_result = store_io.load_task_result = loaded


@pytest.fixture(scope="module")
def masters_store(tiny_survey, tmp_path_factory) -> Path:
    """The tiny survey indexed, with its masters: the photometry's inputs."""
    store = tmp_path_factory.mktemp("loss") / "photocal.zarr"
    index_sequentially(str(tiny_survey.raw), str(store))
    build_masters_sequentially(str(store))
    return store


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "photocal.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store, out)
    return out


def _photometry(store: Path, tiny_survey, runner) -> dict:
    """The first night's photometry, one exposure per chunk (4 chunks)."""
    with prefect_api():
        return photocal_run.with_options(task_runner=runner)(
            store=str(store),
            refcat=str(tiny_survey.refcat),
            nights=tiny_survey.nights[:1],
            stages=["photometry"],
            reduce=ReduceConfig(exposures_per_task=1),
        )


def _lines(log: Path, kind: str) -> list[tuple[str, float]]:
    """(chunk, time) of each ``kind`` line of the log."""
    if not log.exists():
        return []
    rows = (ln.split() for ln in log.read_text().splitlines())
    return [(r[1], float(r[2])) for r in rows if r and r[0] == kind]


def _computations(log: Path) -> Counter:
    """Finished computations per chunk."""
    return Counter(chunk for chunk, _ in _lines(log, "done"))


@pytest.mark.slow  # 60-90 s idle, minutes on a loaded machine: a night's photometry
def test_worker_killed_after_half_the_chunks_recomputes_none_of_them(
    prefect_server, masters_store, tiny_survey, tmp_path
):
    store = _copy(masters_store, tmp_path)
    log = tmp_path / "computed.log"
    kwargs = {**make_task_runner(workers=2).cluster_kwargs, "n_workers": 2}
    index = read_group(store, f"index/{tiny_survey.nights[0]}")
    n_chunks = int(((index.imagetyp == "SCIENCE") & (index.status == "ok")).sum())
    killed: dict = {}
    with prefect_api(), LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        client.register_plugin(CountChunks(str(log)))
        pids = client.run(os.getpid)

        def kill_after_half() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                done = sum(_computations(log).values())
                held = {
                    w: [k for k in keys if "photometer" in str(k)]
                    for w, keys in client.has_what().items()
                }
                victim = max(held, key=lambda w: len(held[w]), default=None)
                if done >= n_chunks // 2 and victim and held[victim]:
                    killed["finished"] = set(_computations(log))
                    killed["held"] = len(held[victim])
                    os.kill(pids[victim], signal.SIGKILL)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_after_half, daemon=True)
        killer.start()
        summary = _photometry(store, tiny_survey, DaskTaskRunner(address=cluster.scheduler_address))
        killer.join(timeout=5)
    assert killed, "no worker was killed"
    counts = _computations(log)
    print(
        f"killed after {len(killed['finished'])} of {n_chunks} chunks finished, holding "
        f"{killed['held']} finished results; computations per chunk: {sorted(counts.values())}"
    )
    # The killed worker held finished chunk results the night still needed: Dask
    # ran those tasks again, and each returned its kept result.
    assert killed["held"] >= 1
    recomputed = {chunk for chunk in killed["finished"] if counts[chunk] > 1}
    assert recomputed == set(), counts
    # Every chunk computed; at most the one running on the killed worker twice.
    assert len(counts) == n_chunks
    assert sum(counts.values()) <= n_chunks + 1, counts
    for night, result in summary["photometry"].items():
        assert result["exposures"] == 4, night
        assert read_group(store, f"nights/{night}/catalog").sizes["obs"] == result["observations"]
    # The run's kept results are gone once it succeeded.
    assert not any((store.parent / ".photocal.zarr.runs").glob("*/*.pkl"))


DRAIN_AFTER_S, DRAIN_STAGGER_S = 20, 5
CHUNK_FLOOR_S = 4.0


@pytest.mark.slow  # 1-3 min: two nights' photometry through a few generations of workers
@pytest.mark.timeout(600)
def test_workers_draining_at_their_lifetime_lose_no_work(
    prefect_server, masters_store, tiny_survey, tmp_path
):
    """Workers with a lifetime, as the slurm spec starts them inside a job's
    walltime (the tasks.lifetime preload: drain after 20 +- 5 s; with no peer to
    take the results, work on and try again every 2 s), replaced by adaptive
    scaling as it submits new jobs; chunks of at least 4 s, so that a worker
    lives for a few of them and leaves in the middle of the night's work. Each
    chunk is computed exactly once: started once (none abandoned mid-run by a
    leaving worker) and finished once (no finished one computed again), and the
    catalogs equal those computed in one process.

    Dask's own ``--lifetime`` (15 +- 5 s) did not finish this night in 900 s
    (docs/reliability.md): it leaves without waiting for the running task."""
    store = _copy(masters_store, tmp_path)
    log = tmp_path / "computed.log"
    kwargs = {
        **make_task_runner(workers=2).cluster_kwargs,
        "n_workers": 0,
        # The pipeline's imports first, so that a worker's lifetime starts once
        # it can run a task: at load 14 they took longer than the 20 s lifetime,
        # and workers left one after the other before running anything.
        "preload": ["flows.pipeline", "tasks.lifetime"],
        "preload_argv": [
            "--drain-after", f"{DRAIN_AFTER_S}s", "--drain-stagger", f"{DRAIN_STAGGER_S}s",
            "--drain-retry", "2s", "--drain-timeout", "120s",
        ],
    }  # fmt: skip
    nights = list(tiny_survey.nights)
    # A replacement once a worker has left for 1 s (Dask's default waits 15 s).
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}),
        prefect_api(),
        LocalCluster(**kwargs) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(CountChunks(str(log), floor_s=CHUNK_FLOOR_S))
        cluster.adapt(minimum=2, maximum=2, interval="500ms")
        summary = photocal_run.with_options(
            task_runner=DaskTaskRunner(address=cluster.scheduler_address)
        )(
            store=str(store),
            refcat=str(tiny_survey.refcat),
            nights=nights,
            stages=["photometry"],
            reduce=ReduceConfig(exposures_per_task=1),
        )
        drains = [
            (t, e)
            for t, e in client.get_events("all")
            if e.get("action") == "retire-workers"
            and str(e.get("stimulus_id", "")).startswith(DRAIN_REASON)
        ]
    starts, done = Counter(c for c, _ in _lines(log, "start")), _lines(log, "done")
    kept = _lines(log, "kept")
    handed = sum(len(e["retired"]) for _, e in drains)
    print(
        f"{len(drains)} hand-over attempts: {handed} handed their results over, "
        f"{len(drains) - handed} found no running peer and worked on; {len(kept)} results "
        f"read back from the store; starts per chunk {sorted(starts.values())}, "
        f"computations {sorted(_computations(log).values())}"
    )
    n_chunks = sum(
        int(((ix.imagetyp == "SCIENCE") & (ix.status == "ok")).sum())
        for ix in (read_group(store, f"index/{n}") for n in nights)
    )
    # Workers left in the middle of the work, not only after it.
    first, last = min(t for _, t in done), max(t for _, t in done)
    assert any(first < t < last for t, e in drains if e["retired"]), (drains, first, last)
    # Nothing lost, nothing done twice.
    assert len(starts) == n_chunks == 8
    assert set(starts.values()) == {1}, starts
    assert set(_computations(log).values()) == {1}, _computations(log)
    reference = _copy(masters_store, tmp_path / "reference")
    for night in nights:
        assert summary["photometry"][night]["exposures"] == 4, night
        reduce_night(str(reference), night, str(tiny_survey.refcat))
        xr.testing.assert_equal(
            read_group(store, f"nights/{night}/catalog"),
            read_group(reference, f"nights/{night}/catalog"),
        )
