"""Shared fixtures. Prefect runs against a throw-away home and a patient
ephemeral server; Dask stays quiet."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="photocal-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.pop("PREFECT_API_URL", None)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sim.badfiles import ALL_KINDS, write_bad_files  # noqa: E402
from tasks.io.store import read_group  # noqa: E402
from tasks.simulate import SimulationResult, simulate_survey  # noqa: E402

TINY_SEED = 3


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (a real API on loopback, SQLite in a temporary
    directory) for every flow test of the session: starting one costs ~10 s.
    Flows see it through the settings; ``flows.api.prefect_api`` exports it to
    their Dask workers. It stays up to the end of the session once started."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    """The tiny preset (2 nights, 8 quadrants of 128 px) plus one damaged file of
    each kind under raw/damaged/. Read-only for tests: copy before modifying."""
    out = tmp_path_factory.mktemp("tiny")
    return simulate_survey(out, preset="tiny", seed=TINY_SEED, bad_files=True)


@pytest.fixture(scope="session")
def bad_corpus(
    tiny_survey: SimulationResult, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path]]:
    """A copy of the tiny raw tree with one bad file of every kind in
    sim.badfiles.ALL_KINDS (instead of the five): (raw root, kind -> path).
    Read-only for tests."""
    raw = Path(shutil.copytree(tiny_survey.raw, tmp_path_factory.mktemp("corpus") / "raw"))
    shutil.rmtree(raw / "damaged")
    truth = read_group(tiny_survey.truth, "exposures")
    paths, types = truth["path"].values.tolist(), truth["imagetyp"].values.tolist()
    first = {k: raw / paths[types.index(k)] for k in ("SCIENCE", "BIAS", "FLAT")}
    bad = write_bad_files(raw, first["SCIENCE"], first["BIAS"], first["FLAT"], kinds=ALL_KINDS)
    return raw, bad


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server, a real HTTP server on a free loopback port, for
    the session. Its endpoint and throw-away credentials are exported the standard
    way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so writer processes and Dask
    workers started from the tests find it as a real deployment would."""
    import socket
    import subprocess
    import sys
    import time
    import uuid

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": f"moto{uuid.uuid4().hex[:12]}",
        "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3_store(s3_server) -> str:
    """A store URL in a new bucket of the session's S3 server."""
    import uuid

    import s3fs

    bucket = f"photocal-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/photocal.zarr"
