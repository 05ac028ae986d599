"""Object-store commits: photocal's own protocol (tasks/io/objstore.py: a new
build per write, published by one conditional PUT of the group's ref) against
Icechunk 1.1 (transactional Zarr: chunks, manifests and snapshots, one commit
per session), on the same S3 server (moto's, started here on loopback), with the
same groups, in one process.

    python benchmarks/store_s3.py [--repeats N]

Measured per operation (median of N): writing + publishing a small group (an
index night: 200 rows, 9 variables), a chunked group (6 arrays x 8 chunks of
128 x 128 float64, a catalog-sized write), reading each back, and reading an
earlier version. Then two processes committing 5 versions each of one group at
once: how many commits land and how many tries the losers needed. Prints each
time, then the ratio (Icechunk / ours) per operation; the last line sums up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing import get_context

import numpy as np
import xarray as xr


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY=uuid.uuid4().hex,
        AWS_DEFAULT_REGION="us-east-1",
    )
    return proc, url


def small_group(value: float) -> xr.Dataset:
    n = 200
    return xr.Dataset(
        {
            "path": ("file", np.array([f"2026/sim_{i}.fits" for i in range(n)], dtype=object)),
            "expid": ("file", np.arange(n, dtype=np.int64)),
            "imagetyp": ("file", np.array(["SCIENCE"] * n, dtype=object)),
            "filter": ("file", np.array(["r"] * n, dtype=object)),
            "mjd": ("file", np.full(n, 61000.0 + value)),
            "exptime_s": ("file", np.full(n, 30.0)),
            "led_id": ("file", np.full(n, -1, dtype=np.int64)),
            "status": ("file", np.array(["ok"] * n, dtype=object)),
            "reason": ("file", np.array([""] * n, dtype=object)),
        },
        attrs={"value": value},
    )


def chunked_group(value: float) -> xr.Dataset:
    dims = ("quadrant", "y", "x")
    rng = np.random.default_rng(int(value))
    # Noise, not constants: constant chunks compress to bytes and Icechunk would
    # inline them into its manifest (real pixels are not like that).
    ds = xr.Dataset(
        {f"v{k}": (dims, value + rng.normal(size=(8, 128, 128))) for k in range(6)},
        attrs={"value": value},
    )
    for var in ds.data_vars.values():
        var.encoding["chunks"] = (1, 128, 128)
    return ds


class Ours:
    name = "commit protocol"

    def __init__(self, bucket: str) -> None:
        self.store = f"s3://{bucket}/ours.zarr"

    def write(self, group: str, ds: xr.Dataset) -> None:
        from tasks.io.store import write_group

        write_group(self.store, group, ds)

    def read(self, group: str, version: int | None = None) -> xr.Dataset:
        from tasks.io.store import read_group

        return read_group(self.store, group, version=version)


class Icechunk:
    name = "icechunk"

    def __init__(self, bucket: str, endpoint: str, create: bool = True) -> None:
        import icechunk

        storage = icechunk.s3_storage(
            bucket=bucket,
            prefix="icechunk",
            endpoint_url=endpoint,
            allow_http=True,
            region="us-east-1",
            access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            force_path_style=True,
        )
        open_ = icechunk.Repository.create if create else icechunk.Repository.open
        self.repo = open_(storage)
        self.snapshots: dict[str, list[str]] = {}

    def write(self, group: str, ds: xr.Dataset) -> int:
        """Write and commit; on a conflict, rebase and retry. Returns the tries."""
        import icechunk

        for attempt in range(1, 200):
            session = self.repo.writable_session("main")
            # icechunk.xarray.to_icechunk 1.1 does not run with this xarray; the
            # datasets are in memory, so xarray writes them to the session directly.
            ds.to_zarr(session.store, group=group, mode="w", consolidated=False, zarr_format=3)
            try:
                self.snapshots.setdefault(group, []).append(session.commit(f"write {group}"))
                return attempt
            except icechunk.ConflictError:
                time.sleep(0.01 * attempt)
        raise RuntimeError("gave up")

    def read(self, group: str, version: int | None = None) -> xr.Dataset:
        import icechunk

        # A reader is another process: a repository opened afresh, without the
        # writer's caches.
        repo = icechunk.Repository.open(self.repo.storage)
        if version is None:
            session = repo.readonly_session(branch="main")
        else:
            session = repo.readonly_session(snapshot_id=self.snapshots[group][version - 1])
        return xr.open_zarr(session.store, group=group, consolidated=False, chunks=None).load()


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def race_writer(kind: str, bucket: str, endpoint: str, writer: int, n: int, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    tries = 0
    if kind == "ours":
        impl: Ours | Icechunk = Ours(bucket)
        for v in range(n):
            impl.write("nights/2026-03-10/catalog", chunked_group(1000.0 * writer + v))
            tries += 1
    else:
        impl = Icechunk(bucket, endpoint, create=False)
        for v in range(n):
            tries += impl.write("nights/2026-03-10/catalog", chunked_group(1000.0 * writer + v))
    queue.put(tries)


def race(kind: str, bucket: str, endpoint: str, n: int = 5) -> tuple[float, int]:
    ctx = get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=race_writer, args=(kind, bucket, endpoint, w, n, queue)) for w in (1, 2)
    ]
    for p in procs:
        p.start()
    tries = sum(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return time.perf_counter() - t0, tries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    proc, endpoint = start_moto()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        impls = [Ours(bucket), Icechunk(bucket, endpoint)]
        results: dict[str, dict[str, float]] = {}
        for impl in impls:
            r = results[impl.name] = {}
            r["write small"] = timed(
                lambda i=impl: i.write("index/2026-03-10", small_group(1)), args.repeats
            )
            r["read small"] = timed(lambda i=impl: i.read("index/2026-03-10"), args.repeats)
            r["write chunked"] = timed(
                lambda i=impl: i.write("nights/2026-03-10/catalog", chunked_group(2)), args.repeats
            )
            r["read chunked"] = timed(
                lambda i=impl: i.read("nights/2026-03-10/catalog"), args.repeats
            )
            r["read version 1"] = timed(
                lambda i=impl: i.read("nights/2026-03-10/catalog", version=1), args.repeats
            )
        print(
            f"moto S3 server on loopback, median of {args.repeats}; load {os.getloadavg()[0]:.1f}"
        )
        print(f"{'operation':<16} {'ours [ms]':>10} {'icechunk [ms]':>14} {'ratio':>7}")
        for op in results["commit protocol"]:
            a, b = results["commit protocol"][op], results["icechunk"][op]
            print(f"{op:<16} {a * 1e3:10.1f} {b * 1e3:14.1f} {b / a:7.2f}")
        wall_ours, tries_ours = race("ours", bucket, endpoint)
        wall_ice, tries_ice = race("icechunk", bucket, endpoint)
        print(
            f"two writers x 5 versions of one group at once: ours {wall_ours:.1f} s, "
            f"{tries_ours} writes for 10 versions; icechunk {wall_ice:.1f} s, "
            f"{tries_ice} tries for 10 commits (conflicts rebased or rewritten)"
        )
        ratios = [
            results["icechunk"][op] / results["commit protocol"][op] for op in results["icechunk"]
        ]
        median = statistics.median(ratios)
        print(
            f"store_s3: icechunk / commit protocol time ratio: median {median:.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} operations"
        )
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
