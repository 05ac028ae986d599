"""The slurm cluster spec against a real Slurm on this machine: munged,
slurmctld and slurmd started on loopback by the fixture from Debian's munge and
slurm-wlm (installed here when missing and possible; skipped with the reason
otherwise). Accounting runs without a database: job completions go to a
jobcomp/filetxt log, which ``sacct --completion`` reads."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.utilities.importtools import from_qualified_name

from flows.runners import make_task_runner

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scancel")
SITE = [  # what an operator gives for this one-node "site"
    "queue=debug",
    "account=null",
    "cores=1",
    "processes=1",
    "memory=2GB",
    "walltime=00:20:00",
    "interface=lo",
    "adapt.maximum_jobs=2",
]


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _install() -> str | None:
    """Install munge and slurm-wlm where we can; the reason they are missing otherwise."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{_missing()} missing and no root apt-get to install munge, slurm-wlm"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "munge", "slurm-wlm"],
    ):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=True)
        except (subprocess.SubprocessError, OSError) as err:
            return f"could not install munge, slurm-wlm: {err}"
    return f"{_missing()} still missing after installing" if _missing() else None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"slurm test setup: {what} did not happen in {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm: yields the directory holding its config and logs, with
    SLURM_CONF exported for the client commands (sbatch, squeue, sacct)."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o755)
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _free_ports(2)
    sock = d / "munge.sock"
    subprocess.run(["mungekey", "-c", "-k", str(d / "munge.key")], check=True)
    conf = d / "slurm.conf"
    conf.write_text(
        f"""ClusterName=photocal-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=6000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    env_before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    procs = []
    try:
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={d / 'munge.key'}",
                f"--log-file={d / 'munged.log'}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            check=True,
        )
        procs.append(d / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(conf)], check=True)
            procs.append(d / f"{daemon}.pid")
        _wait(
            lambda: (
                "idle"
                in subprocess.run(
                    ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True
                ).stdout
            ),
            "the node going idle",
        )
        yield d
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True)
        for pid_file in reversed(procs):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), 15)
        if env_before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = env_before


def _jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def _completed_jobs() -> list[dict[str, str]]:
    """Jobs in the completion log, through sacct."""
    out = subprocess.run(
        ["sacct", "--completion", "-n", "-P", "-o", "jobid,jobname,state,end"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        dict(zip(("jobid", "name", "state", "end"), ln.split("|"), strict=False))
        for ln in out.splitlines()
        if ln
    ]


class _Watch:
    """squeue every 0.25 s in a thread: the Slurm job ids seen, in order."""

    def __init__(self) -> None:
        self.timeline: list[tuple[float, int]] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            jobs = _jobs()
            self.seen.update(jobs)
            self.timeline.append((time.monotonic() - t0, len(jobs)))
            time.sleep(0.25)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_adaptive_slurm_workers_scale_from_zero_and_back(slurm, tmp_path):
    """The slurm spec with this site's values: no job while idle, up to 2 jobs
    while tasks wait, back to none once they are done, with the cluster still
    up; the workers were Slurm jobs (sacct lists them)."""
    from distributed import Client

    from flows.runners import load_cluster_spec, parse_cluster_options

    runner = make_task_runner(
        cluster="slurm",
        cluster_options={
            **parse_cluster_options(SITE),
            "local_directory": str(tmp_path),
            "log_directory": str(tmp_path),
            "adapt.interval": "500ms",
            "adapt.wait_count": 4,
        },
    )
    assert load_cluster_spec("slurm").adapt_kwargs["minimum_jobs"] == 0
    cls = runner.cluster_class
    if isinstance(cls, str):
        cls = from_qualified_name(cls)
    with cls(**runner.cluster_kwargs) as cluster, _Watch() as watch:
        cluster.adapt(**runner.adapt_kwargs)
        time.sleep(2)
        assert _jobs() == []  # nothing submitted while idle
        with Client(cluster) as client:
            # time.sleep: a function the Slurm workers import by name.
            futures = client.map(time.sleep, [6.0] * 8, pure=False)
            assert client.gather(futures) == [None] * 8
            del futures  # results held on a worker would keep it
            _wait(lambda: _jobs() == [], "adaptive scale-down to 0 jobs", timeout=90)
            assert cluster.scheduler_info["workers"] == {}
    peak = max(n for _, n in watch.timeline)
    assert peak == 2, watch.timeline
    done = {j["jobid"]: j for j in _completed_jobs()}
    assert watch.seen <= set(done), (watch.seen, done)
    assert all(done[j]["name"] == "dask-worker" for j in watch.seen)


@pytest.mark.slow  # the tiny preset's index, masters and photometry on Slurm workers
def test_photocal_run_on_slurm(slurm, tiny_survey, tmp_path):
    store = tmp_path / "photocal.zarr"
    site = [a for opt in SITE for a in ("--cluster-option", opt)]
    cmd = [
        sys.executable, "-m", "flows.cli", "run", "--store", str(store),
        "--raw", str(tiny_survey.raw), "--refcat", str(tiny_survey.refcat),
        "--cluster", "slurm", *site,
        "--cluster-option", f"local_directory={tmp_path}",
        "--cluster-option", f"log_directory={tmp_path}",
    ]  # fmt: skip
    before = {j["jobid"] for j in _completed_jobs()}
    t0 = time.monotonic()
    with _Watch() as watch:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for night in tiny_survey.nights:
        assert f"nights/{night}/catalog: exposures 4" in proc.stdout
    assert watch.timeline[0][1] == 0
    peak = max(n for _, n in watch.timeline)
    assert peak >= 2, watch.timeline
    assert _jobs() == []
    jobs = [j for j in _completed_jobs() if j["jobid"] not in before]
    assert {j["jobid"] for j in jobs} >= watch.seen
    print(f"photocal on slurm: {wall:.0f} s, {len(jobs)} worker jobs, peak {peak}")
