"""Reliability of the whole flow on real processes: the bad-input corpus with an
empty night, a Dask worker SIGKILLed mid-run, the flow process SIGKILLed while it
writes, and a nightly run beside an overlapping backfill. The stored results must
equal those of an undisturbed run, value by value; raw files are never modified."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xarray as xr
from distributed import Client, LocalCluster
from prefect_dask import DaskTaskRunner

from flows.api import prefect_api
from flows.pipeline import photocal_run
from flows.runners import make_task_runner
from sim.badfiles import ALL_KINDS, write_refcat_missing_columns
from tasks.index import index_sequentially
from tasks.io.raw import RawFileError
from tasks.io.store import group_exists, list_children, list_groups, read_group

pytestmark = pytest.mark.integration

STAGES = ["index", "masters", "reduce", "photometry"]
EMPTY_NIGHT = "2026-03-20"  # inside the survey's span, nothing observed
REPO = Path(__file__).resolve().parents[2]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _groups(store: Path) -> dict[str, xr.Dataset]:
    """Every complete group of the store, loaded, by path."""
    out = {}
    for dirpath, _, files in os.walk(store):
        if "zarr.json" in files:
            group = os.path.relpath(dirpath, store)
            if group != "." and group_exists(store, group):
                out[group] = read_group(store, group)
    return out


def assert_same_results(store: Path, reference: tuple[Path, dict[str, xr.Dataset]]) -> None:
    """Same groups as the reference run's, each equal value by value, attrs
    included (paths inside the store compared relative to it)."""
    ref_store, ref_groups = reference
    got = _groups(store)
    assert sorted(got) == sorted(ref_groups)
    for group, ds in ref_groups.items():
        xr.testing.assert_equal(got[group], ds)
        mine = json.dumps(got[group].attrs, sort_keys=True).replace(str(store), "STORE")
        theirs = json.dumps(ds.attrs, sort_keys=True).replace(str(ref_store), "STORE")
        assert mine == theirs, group


def _run(store: Path, raw: Path, refcat: Path, nights: list[str], runner) -> dict:
    # A range of nights, one of them empty: listed in the summary, not a failure
    # (named nights that lack their input fail the run: docs/configuration.md).
    with prefect_api():
        return photocal_run.with_options(task_runner=runner)(
            store=str(store),
            raw=str(raw),
            refcat=str(refcat),
            nights=nights,
            stages=STAGES,
            strict_nights=False,
        )


@pytest.fixture(scope="module")
def reference(prefect_server, bad_corpus, tiny_survey, tmp_path_factory):
    """The undisturbed run over the corpus, every night plus an empty one."""
    raw, _ = bad_corpus
    before = _digests(raw)
    store = tmp_path_factory.mktemp("reference") / "photocal.zarr"
    nights = [*tiny_survey.nights, EMPTY_NIGHT]
    summary = _run(store, raw, tiny_survey.refcat, nights, make_task_runner(workers=2))
    return summary, (store, _groups(store)), before


def test_bad_inputs_are_rejected_and_the_run_completes(reference, bad_corpus, tiny_survey):
    summary, (_, groups), before = reference
    raw, bad = bad_corpus
    rejected = dict(summary["rejected"])
    assert sorted(rejected) == sorted(p.relative_to(raw).as_posix() for p in bad.values())
    assert len(rejected) == len(ALL_KINDS)
    assert all(reason and "\n" not in reason for reason in rejected.values())
    # The good data went all the way: masters and a catalog of every observed night,
    # with every good science exposure of it.
    truth = read_group(tiny_survey.truth, "exposures").to_dataframe()
    for night in tiny_survey.nights:
        science = truth[(truth.night == night) & (truth.imagetyp == "SCIENCE")]
        exposures = groups[f"nights/{night}/exposures"]
        assert sorted(exposures["expid"].values.tolist()) == sorted(science.expid)
        assert groups[f"nights/{night}/catalog"].sizes["obs"] > 100
        # The flow's plan -> photometer_chunk_task.map -> write_night_task chain
        # reports what it wrote.
        catalog, counts = groups[f"nights/{night}/catalog"], summary["photometry"][night]
        assert counts["exposures"] == len(science)
        assert counts["observations"] == catalog.sizes["obs"]
        assert counts["clean"] == int((catalog.flags.values == 0).sum())
    assert any(g.startswith("masters/bias/") for g in groups)
    assert any(g.startswith("masters/flat/") for g in groups)
    # The empty night: nothing written, nothing failed, and said so per stage.
    assert not any(EMPTY_NIGHT in g for g in groups)
    missing = {(m["stage"], m["group"]) for m in summary["missing"] if m["night"] == EMPTY_NIGHT}
    assert missing == {(s, f"index/{EMPTY_NIGHT}") for s in ("index", "masters", "photometry")}
    assert _digests(raw) == before


def test_refcat_with_missing_columns_fails_the_run_before_any_write(
    prefect_server, bad_corpus, tiny_survey, tmp_path
):
    raw, _ = bad_corpus
    refcat = write_refcat_missing_columns(tiny_survey.refcat, tmp_path / "refcat.fits")
    store = tmp_path / "photocal.zarr"
    with pytest.raises(RawFileError, match=r"refcat\.fits: reference catalog: column 'g_mag'"):
        _run(store, raw, refcat, list(tiny_survey.nights), make_task_runner(workers=1))
    assert not store.exists()


def _kill_a_busy_worker(client: Client, pids: dict[str, int], killed: list) -> None:
    """SIGKILL the worker running a photometry chunk, as soon as one runs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        for worker, keys in client.processing().items():
            if any("photometer" in str(k) for k in keys):
                time.sleep(0.5)  # well inside the task, not at its start
                os.kill(pids[worker], signal.SIGKILL)
                killed.append((worker, sorted(map(str, keys))))
                return
        time.sleep(0.05)


def test_a_worker_killed_mid_run_changes_nothing(reference, bad_corpus, tiny_survey, tmp_path):
    _, expected, _ = reference
    raw, _ = bad_corpus
    store = tmp_path / "photocal.zarr"
    nights = [*tiny_survey.nights, EMPTY_NIGHT]
    kwargs = {**make_task_runner(workers=2).cluster_kwargs, "n_workers": 2}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        killed: list = []
        killer = threading.Thread(
            target=_kill_a_busy_worker, args=(client, pids, killed), daemon=True
        )
        killer.start()
        _run(
            store,
            raw,
            tiny_survey.refcat,
            nights,
            DaskTaskRunner(address=cluster.scheduler_address),
        )
        killer.join(timeout=5)
        assert killed, "no worker was killed: the photometry never ran?"
        assert pids[killed[0][0]] not in client.run(os.getpid).values()
    assert_same_results(store, expected)


def _photocal(store: Path, raw: Path, refcat: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--raw", str(raw)]
    return subprocess.Popen(
        [*cmd, "--refcat", str(refcat), "--workers", "1", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its Dask workers die with it
    )


@pytest.mark.slow  # 70-90 s: a partial run and a full one, one worker each
def test_flow_killed_while_writing_then_rerun(reference, bad_corpus, tiny_survey, tmp_path):
    """SIGKILL the flow process (and its workers) while the masters are being
    written: no group that is incomplete reads as complete; a re-run gives the
    undisturbed result."""
    _, expected, _ = reference
    raw, _ = bad_corpus
    store = tmp_path / "photocal.zarr"
    staging = tmp_path / ".photocal.zarr.staging"
    proc = _photocal(store, raw, tiny_survey.refcat)
    deadline = time.monotonic() + 300
    # Once the index is written, the masters are built in pieces in a staging
    # directory: kill while one is there.
    n_index = len([g for g in expected[1] if g.startswith("index/")])
    while not (
        len(list_groups(store, "index")) == n_index and staging.is_dir() and any(staging.iterdir())
    ):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    partial = _groups(store)
    assert partial, "nothing was written before the kill"
    assert len(partial) < len(expected[1])
    for group, ds in partial.items():  # what reads as complete is complete and right
        xr.testing.assert_equal(ds, expected[1][group])
    rerun = _photocal(store, raw, tiny_survey.refcat)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert_same_results(store, expected)
    assert list_children(store, "nights") == sorted(tiny_survey.nights)


@pytest.mark.slow  # 60 s: two full runs at once on two cores
def test_nightly_and_backfill_over_overlapping_nights_at_once(
    reference, bad_corpus, tiny_survey, tmp_path
):
    """A nightly run of the last night and a backfill of every night, started
    together on a store that already has the index (as yesterday's runs left it):
    both succeed and every group is the undisturbed one."""
    _, expected, _ = reference
    raw, _ = bad_corpus
    store = tmp_path / "photocal.zarr"
    index_sequentially(str(raw), str(store))
    last = tiny_survey.nights[-1]
    runs = [
        _photocal(store, raw, tiny_survey.refcat, "--night", last),
        _photocal(
            store, raw, tiny_survey.refcat, *(a for n in tiny_survey.nights for a in ("--night", n))
        ),
    ]
    for proc in runs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    assert_same_results(store, expected)
