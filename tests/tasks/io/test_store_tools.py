"""photocal store ls / copy / gc / rollback on local stores, through the command
line; gc against staging left by a really killed writer and one still held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from flows.cli import main
from tasks.io.store import COMPLETE_ATTR, begin_group, read_group, staging_lock, write_group
from tasks.io.store_tools import collect_garbage, list_store, parse_duration

REPO = Path(__file__).resolve().parents[3]


def _ds(value: float) -> xr.Dataset:
    return xr.Dataset({"flux": ("obs", np.full(3, value))}, attrs={"value": value})


def test_ls_lists_groups_with_their_state(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    write_group(store, "index/2026-03-10", _ds(1))
    write_group(store, "nights/2026-03-10/catalog", _ds(2))
    # What a killed in-place writer of old left: arrays, no completion marker.
    _ds(3).to_zarr(
        str(store), group="nights/2026-03-11/catalog", mode="w", zarr_format=3, consolidated=False
    )
    states = {g.name: g.state for g in list_store(str(store))}
    assert states == {
        "index/2026-03-10": "complete",
        "nights/2026-03-10/catalog": "complete",
        "nights/2026-03-11/catalog": "incomplete",
    }
    assert main(["store", "ls", str(store), "nights"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["nights/2026-03-10/catalog  complete", "nights/2026-03-11/catalog  incomplete"]


def test_copy_copies_complete_groups_unchanged(tmp_path, capsys):
    src, dst = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_group(src, "index/2026-03-10", _ds(1), attrs={"stage": "index"})
    write_group(src, "index/2026-03-11", _ds(2))
    assert main(["store", "copy", str(src), str(dst), "--group", "index/2026-03-11"]) == 0
    assert "1 group(s) copied" in capsys.readouterr().out
    assert [g.name for g in list_store(str(dst))] == ["index/2026-03-11"]
    assert main(["store", "copy", str(src), str(dst)]) == 0
    for g in ("index/2026-03-10", "index/2026-03-11"):
        xr.testing.assert_identical(read_group(dst, g), read_group(src, g))
    assert main(["store", "copy", str(src), str(dst), "--group", "index/nope"]) == 1
    assert "'index/nope'" in capsys.readouterr().err


def test_rollback_refuses_a_local_store(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    write_group(store, "index/2026-03-10", _ds(1))
    assert main(["store", "rollback", str(store), "--as-of", "2026-01-01T00:00"]) == 1
    assert "keeps one version" in capsys.readouterr().err


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "15m", "12h", "2d")] == [
        90,
        90,
        900,
        43200,
        172800,
    ]
    with pytest.raises(ValueError, match="'soon'"):
        parse_duration("soon")


def _template() -> xr.Dataset:
    import dask.array as da

    return xr.Dataset({"bias": (("q", "y"), da.zeros((2, 4), chunks=(1, 4)))})


def test_gc_removes_a_killed_writers_staging_and_keeps_a_held_one(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    write_group(store, "index/2026-03-10", _ds(1))
    # A writer SIGKILLed while holding its staging lock, mid-write.
    script = (
        "import sys, time\n"
        "from tasks.io.store import begin_group, staging_lock\n"
        "import dask.array as da, xarray as xr\n"
        "t = xr.Dataset({'bias': (('q', 'y'), da.zeros((2, 4), chunks=(1, 4)))})\n"
        f"s = begin_group({str(store)!r}, 'masters/bias/2026-03-01', t)\n"
        "with staging_lock(s, shared=True):\n"
        "    print(s, flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    dead = proc.stdout.readline().strip()
    held = begin_group(store, "masters/bias/2026-03-02", _template())
    with staging_lock(held, shared=True):  # a live writer of the other build
        # While the writer lives its staging is locked: kept even at age 0.
        assert collect_garbage(str(store), min_age_s=0) == []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        assert main(["store", "gc", str(store), "--min-age", "1h", "--dry-run"]) == 0
        assert "would remove 0 item(s)" in capsys.readouterr().out
        assert main(["store", "gc", str(store), "--min-age", "0s"]) == 0
    out = capsys.readouterr().out
    assert f"removed {dead}: staging build" in out
    assert "removed 1 item(s)" in out
    assert not Path(dead).exists()
    assert Path(held).is_dir()
    assert read_group(store, "index/2026-03-10").attrs["value"] == 1


def test_gc_removes_kept_results_of_old_runs_only(tmp_path):
    from tasks.io.store import load_task_result, save_task_result

    store = tmp_path / "s.zarr"
    save_task_result(store, "run-old", "k", b"x")
    save_task_result(store, "run-new", "k", b"y")
    old = tmp_path / ".s.zarr.runs" / "run-old"
    past = time.time() - 7200
    for p in [old, *old.iterdir()]:
        os.utime(p, (past, past))
    removed = collect_garbage(str(store), min_age_s=3600)
    assert len(removed) == 1
    assert "run run-old" in removed[0]
    assert load_task_result(store, "run-old", "k") is None
    assert load_task_result(store, "run-new", "k") == b"y"


def test_incomplete_marker_is_what_ls_reads(tmp_path):
    store = tmp_path / "s.zarr"
    write_group(store, "g", _ds(1))
    zarr.open_group(str(store), path="g", mode="r+").attrs[COMPLETE_ATTR] = False
    assert [g.state for g in list_store(str(store))] == ["incomplete"]
