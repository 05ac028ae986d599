"""Faults injected into real writer processes (store_writer.py): SIGKILL mid-write,
two processes rewriting the same group at once, lock holders killed. The store
must never show a group that is incomplete or mixes two versions, and a rewrite
after the fault must give the right result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.io.store import group_exists, group_lock, list_groups, read_group

WRITER = Path(__file__).with_name("store_writer.py")
GROUP = "nights/2026-03-10/catalog"
REPO = Path(__file__).resolve().parents[3]

MIN_KILLS = 4
"""Kills of the killed-writer test (README's table counts them)."""
MAX_KILLS = 12
"""Kills at most, while none has fallen inside a rewrite (a loaded machine)."""


def _start_writer(
    store: Path | str, writer: int, n_versions: int, *, size: int = 128, env: dict | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(store), GROUP, str(writer), str(n_versions), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def _kill_in_version(proc: subprocess.Popen, n: int, delay, write_s: float) -> float:
    """SIGKILL the writer ``delay(shortest write so far)`` seconds after it
    started version ``n``, by its own clock; returns the shortest write seen
    (``write_s`` 0: none yet). Not the longest and not from when this process
    reads the line: at load 15 the first write of each process (its warm-up) was
    several times the others and the line was read late, and all 12 kills of a
    run fell after the write had finished."""
    started = time.time()
    for line in proc.stdout:
        fields = line.split()
        if fields[0] == "done":
            took = float(fields[2])
            write_s = took if write_s <= 0 else min(write_s, took)
        elif fields[0] == "start" and int(fields[1]) == n:
            started = float(fields[2])
            break
    time.sleep(max(0.0, started + delay(write_s) - time.time()))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    return write_s


def _version_of(store: Path | str, size: int = 128) -> tuple[int, int] | None:
    """(writer, version) of the stored group, checked to be complete and unmixed;
    None when there is no complete group."""
    if not group_exists(store, GROUP):
        return None
    ds = read_group(store, GROUP)
    writer, version = ds.attrs["writer"], ds.attrs["version"]
    expected = 1000.0 * writer + version
    assert sorted(ds.data_vars) == [f"v{k}" for k in range(6)]
    for name, var in ds.data_vars.items():
        assert var.shape == (8, size, size), name
        # Every chunk of every array from the version the attrs name: nothing torn.
        np.testing.assert_array_equal(np.unique(var.values), [expected], err_msg=name)
    return writer, version


def test_writer_killed_mid_write_never_leaves_a_partial_group(tmp_path):
    """SIGKILL lands at a random moment of rewriting version v (odd v: write_group,
    even v: pieces + commit); the group then reads as version v - 1 or v, complete,
    or as absent (killed between the two renames of the swap), never torn."""
    store = tmp_path / "photocal.zarr"
    rng = random.Random(8)
    proc = _start_writer(store, 1, 1)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    write_s = 0.0
    outcomes: list[bool] = []
    # At least MIN_KILLS rounds, more (up to MAX_KILLS) until one falls inside a rewrite.
    while len(outcomes) < MIN_KILLS or (not any(outcomes) and len(outcomes) < MAX_KILLS):
        n = 2 + len(outcomes) % 2  # the kill falls in the last version: alternately pieced/whole
        proc = _start_writer(store, 1, n)
        write_s = _kill_in_version(proc, n, lambda w: rng.uniform(0.0, 1.2 * w), write_s)
        got = _version_of(store)
        assert got is None or got in {(1, n - 1), (1, n)}, got
        outcomes.append(got != (1, n))  # True: killed before the new version was in place
    # No stray group was published anywhere else in the store.
    assert list_groups(store, "nights/2026-03-10") in ([], ["catalog"])
    # A rewrite after the crashes gives the right result.
    proc = _start_writer(store, 1, 3)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert _version_of(store) == (1, 3)
    # At least one kill really fell inside a rewrite (most do).
    assert any(outcomes), outcomes


def test_concurrent_writers_of_one_group_publish_whole_versions(tmp_path):
    """Two processes rewrite the same group 8 times each, at once, while this
    process keeps reading it: both finish without error, and every read, as well
    as the final group, is one complete version of one writer."""
    store = tmp_path / "photocal.zarr"
    writers = [_start_writer(store, w, 8) for w in (1, 2)]
    seen: set[tuple[int, int]] = set()
    while any(p.poll() is None for p in writers):
        got = _version_of(store)
        if got is not None:
            seen.add(got)
    for p in writers:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.count("done") == 8
    final = _version_of(store)
    assert final in {(1, 8), (2, 8)}
    assert len(seen) >= 3, seen  # the reads really overlapped the writes


def test_a_killed_lock_holder_leaves_no_stale_lock(tmp_path):
    """The kernel drops a flock when its holder dies: a SIGKILLed holder does not
    block the next writer."""
    store = tmp_path / "photocal.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tasks.io.store import group_lock\n"
            f"with group_lock({str(store)!r}, {GROUP!r}):\n"
            "    print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    acquired = threading.Event()

    def take() -> None:
        with group_lock(store, GROUP):
            acquired.set()

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    # While the holder lives, the lock is really held.
    assert not acquired.wait(0.5)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    holder.stdout.close()
    assert acquired.wait(10.0)
    waiter.join(timeout=10)


def test_shared_read_waits_for_a_writer(tmp_path):
    """A loaded read takes the group's shared lock: it cannot run while a writer
    holds the exclusive one (what keeps reads from mixing two versions)."""
    store = tmp_path / "photocal.zarr"
    proc = _start_writer(store, 1, 1)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    done = threading.Event()

    def read() -> None:
        read_group(store, GROUP)
        done.set()

    with group_lock(store, GROUP):
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert not done.wait(0.5)
    assert done.wait(30.0)
    reader.join(timeout=30)


def test_a_store_without_room_for_locks_is_read_but_not_written(tmp_path):
    """Where the lock file cannot be created (a read-only store; here its place is
    taken by a file), reads go ahead without the lock and writes refuse."""
    store = tmp_path / "photocal.zarr"
    proc = _start_writer(store, 1, 1)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    locks = tmp_path / ".photocal.zarr.locks"
    for f in locks.iterdir():
        f.unlink()
    locks.rmdir()
    locks.write_text("not a directory")
    assert _version_of(store) == (1, 1)
    with pytest.raises(OSError), group_lock(store, GROUP):
        pass
